"""Image files (PNG, JPEG, DICOM) to normalised arrays, and the preprocessing spec.

:func:`load_image` turns one file into a float32 ``(H, W)`` greyscale array
in ``[0, 1]`` (0 = black as displayed); :func:`to_tensor` turns that array into
the network input described by a :class:`Preprocessing`. The preprocessing is
recorded in every checkpoint and applied identically at training and scoring,
and its :meth:`Preprocessing.signature` is part of every score-cache key.

Nothing from a DICOM header except the pixel-description attributes (size,
bits, photometric interpretation, rescale and VOI attributes, transfer
syntax) is read into covreport: no patient identifier leaves this module,
not even in error messages.
"""

import dataclasses
import hashlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np

from covreport.errors import ImageError, ModelError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")

#: Images smaller than this on either side are refused ("too small").
MIN_IMAGE_SIDE = 16

#: Images with more pixels than this are refused before any pixel is decoded
#: (a chest radiograph has 5-25 million; a 16-bit image at the limit takes
#: 80 MB decoded plus 160 MB as float32). Pillow's own ``MAX_IMAGE_PIXELS``
#: applies too when it is lower. A larger JPEG is decoded at 1/2, 1/4 or 1/8
#: scale (JPEG draft mode, DCT scaling) when that brings it under the limit.
MAX_IMAGE_PIXELS = 40_000_000

#: DICOM pixel data are refused when decoding them would take more bytes than
#: a 16-bit greyscale image at :data:`MAX_IMAGE_PIXELS` (80 MB): the limit
#: counts rows x columns x samples per pixel x bytes per sample x frames, so a
#: 6000 x 6000 RGB image (108 MB) is refused as a 9000 x 9000 greyscale one is.
#: It follows :data:`MAX_IMAGE_PIXELS` (and Pillow's limit when lower).
PIXEL_BYTES_PER_PIXEL = 2

#: A dataset in the Deflated transfer syntax is inflated by covreport itself,
#: never to more than this many bytes beyond the pixel-data limit (pydicom
#: would inflate it whole, however large: 950 KB can hold a 1 GB element).
DEFLATE_HEADER_ROOM = 16 << 20

#: DICOM Deflated Explicit VR Little Endian transfer syntax (PS3.5 A.5).
DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"

#: Magic bytes of image formats: only PNG, JPEG and DICOM are decoded; the
#: others are named in the reason they are refused. Pillow is only ever asked
#: to open PNG or JPEG (its EPS plugin would start Ghostscript).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"),
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"8BPS", "PSD"),
    (b"\x76\x2f\x31\x01", "OpenEXR"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"), (b"qoif", "QOI"),
)


def sniff_format(data, name=""):
    """The format of image bytes by their magic bytes: ``"PNG"``, ``"JPEG"``, ``"DICOM"`` or another name.

    DICOM is recognised by ``DICM`` at byte 128, or by a ``.dcm``/``.dicom``
    suffix when the bytes are no other known format (a raw dataset). Returns
    ``None`` for bytes of no known format.
    """
    head = bytes(data[:132])
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    if head[:4] == b"RIFF" and bytes(data[8:12]) == b"WEBP":
        return "WebP"
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1", b"ftypheix"):
        return "AVIF/HEIF"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if Path(str(name)).suffix.lower() in DICOM_SUFFIXES:
        return "DICOM"
    return None


def _pixel_limit():
    from PIL import Image

    pil = Image.MAX_IMAGE_PIXELS
    return MAX_IMAGE_PIXELS if pil is None else min(MAX_IMAGE_PIXELS, int(pil))


def _not_supported(fmt):
    if fmt is None:
        return "not a recognised image format (PNG, JPEG or DICOM expected)"
    return f"not a recognised image format: the file holds {fmt} data (PNG, JPEG or DICOM expected)"

#: Bumped whenever :func:`load_image` or :func:`to_tensor` change what they
#: compute, so that old cache entries are not reused.
PREPROCESSING_VERSION = 1

#: Stated range of the network input side (pixels): a checkpoint asking for
#: more is refused at load (30,000 px would need 10.8 GB per image).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 2048
#: Preprocessing means lie within [-MAX_NORM, MAX_NORM], stds within [1/MAX_NORM, MAX_NORM].
MAX_NORM = 1e6

RESIZE_METHODS = ("bilinear", "bicubic", "area", "nearest")

#: What to install to decode compressed DICOM pixel data pydicom cannot.
DICOM_DECODER_HINT = (
    "install a pydicom decoder plugin: pip install pylibjpeg pylibjpeg-libjpeg "
    "pylibjpeg-openjpeg pylibjpeg-rle (or python-gdcm), or convert the file to "
    "uncompressed DICOM or PNG"
)


# --------------------------------------------------------------------------
# Preprocessing specification
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a greyscale image in ``[0, 1]`` becomes the network input.

    Parameters
    ----------
    size : int
        The image is resized (aspect ratio not kept) to ``size x size``.
    resize : {"bilinear", "bicubic", "area", "nearest"}
        Interpolation; bilinear and bicubic are antialiased when shrinking
        (as PIL does), so downsampling does not alias.
    mean, std : tuple of float
        Per-channel normalisation ``(x - mean) / std``; one value per channel.
        The defaults are ImageNet's, as used with torchvision's DenseNet121.
    channels : int
        The greyscale image is replicated to this many channels (3 for
        ImageNet-initialised networks, 1 for torchxrayvision's).
    """

    size: int = 320
    resize: str = "bilinear"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    channels: int = 3

    def __post_init__(self):
        try:
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
        except (TypeError, ValueError):
            raise ModelError(
                f"preprocessing mean and std must be lists of numbers, got "
                f"mean={self.mean!r}, std={self.std!r}"
            ) from None
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)):
            raise ModelError(f"preprocessing size must be an integer, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        if not MIN_INPUT_SIZE <= self.size <= MAX_INPUT_SIZE:
            raise ModelError(f"preprocessing size must be {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} pixels, "
                             f"got {self.size}")
        if self.resize not in RESIZE_METHODS:
            raise ModelError(
                f"preprocessing resize must be one of {', '.join(RESIZE_METHODS)}, "
                f"got {self.resize!r}"
            )
        if self.channels not in (1, 3):
            raise ModelError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if len(mean) != self.channels or len(std) != self.channels:
            raise ModelError(
                f"preprocessing needs one mean and one std per channel ({self.channels}), "
                f"got {len(mean)} means and {len(std)} stds"
            )
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std) \
                or not all(abs(m) <= MAX_NORM for m in mean) \
                or not all(1 / MAX_NORM <= s <= MAX_NORM for s in std):
            raise ModelError(
                f"preprocessing mean must be finite (within [-{MAX_NORM:g}, {MAX_NORM:g}]) and std positive "
                f"(within [{1 / MAX_NORM:g}, {MAX_NORM:g}]), got mean={mean}, std={std}"
            )

    def to_dict(self):
        """Plain JSON-serialisable form (lists, not tuples), for checkpoints and outputs."""
        return {
            "size": self.size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ModelError`."""
        if not isinstance(d, dict):
            raise ModelError(f"preprocessing must be a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ModelError(
                f"unknown preprocessing field(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(fields))} (written by a newer covreport?)"
            )
        return cls(**d)

    def signature(self):
        """A stable 16-hex-digit hash of this preprocessing and the loader version.

        Two preprocessings with the same signature give identical network
        inputs for the same file; the signature is part of cache keys.
        """
        payload = json.dumps(
            {"version": PREPROCESSING_VERSION, **self.to_dict()},
            sort_keys=True, separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("ascii")).hexdigest()[:16]


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _error(name, reason):
    # No memory addresses in reasons: they go into results.json, which must
    # be identical between runs.
    from covreport.inputs import safe_text

    reason = re.sub(r" at 0x[0-9a-fA-F]+", "", reason)
    exc = ImageError(f"{safe_text(str(name))}: {reason}")  # a path from a manifest: escaped for the terminal
    exc.reason = reason
    return exc


def load_image(path):
    """Read a PNG, JPEG or DICOM file as a float32 ``(H, W)`` array in ``[0, 1]``.

    Parameters
    ----------
    path : str or path-like
        The image file. Its format is decided by its magic bytes
        (:func:`sniff_format`): PNG and JPEG are decoded by Pillow's PNG or
        JPEG plugin only, DICOM by pydicom; anything else (GIF, TIFF, WebP,
        EPS, ... whatever the file's name) is refused, and no external
        program is ever started. Images over :data:`MAX_IMAGE_PIXELS` are
        refused before decoding (a JPEG is decoded at a reduced scale when
        that fits).

    Returns
    -------
    numpy.ndarray
        float32 greyscale, 0 = black and 1 = white as a radiologist sees it
        (MONOCHROME1 inverted, EXIF orientation applied).

    Raises
    ------
    ImageError
        Naming the file and the reason (also in its ``reason`` attribute, a
        short phrase for the flow diagram): missing, empty, not an image,
        truncated, too small, a decompression bomb, DICOM without pixel data,
        an undecodable transfer syntax (with what to install).

    Notes
    -----
    PNG/JPEG: 8-bit data are divided by 255 and 16-bit (``I;16``) by 65535;
    32-bit integer (``I``) data by 65535 when within ``[0, 65535]``, else
    min-max scaled; colour is converted with the ITU-R 601 luma weights
    (Pillow's ``L`` conversion, in floating point); alpha is dropped.
    DICOM: modality LUT (rescale slope/intercept), then VOI LUT or window
    (pydicom's ``apply_modality_lut`` and ``apply_voi_lut``, DICOM PS3.3
    C.11), scaled by the output range of that transform; with no VOI
    attributes the values are min-max scaled.
    """
    data = read_image_bytes(path)
    return decode_image(data, name=str(path))


def _open_image(path):
    """``(file, format, size)``: ``path`` opened after the checks every image read starts with.

    In this order, before anything is hashed or decoded: the path names a
    regular file (not a folder, FIFO, device or socket), not empty, no larger
    than the ``"image"`` limit of :data:`covreport.inputs.LIMITS` (checked on
    the opened descriptor, through :func:`covreport.inputs.open_binary`), and
    its magic bytes are those of PNG, JPEG or DICOM (:func:`sniff_format`).
    Raises :class:`ImageError` with a short reason otherwise.
    """
    import os
    import stat

    from covreport.inputs import LIMITS, limit_text, open_binary

    p = Path(path)
    limit = LIMITS["image"]
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _error(path, "broken symbolic link" if p.is_symlink() else "file not found") from None
    except (OSError, ValueError) as exc:
        raise _error(path, f"cannot read file ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _error(path, "not a file")
    if not stat.S_ISREG(st.st_mode):
        raise _error(path, "not a regular file (a named pipe, device or socket)")
    if st.st_size == 0:
        raise _error(path, "empty file")
    if st.st_size > limit:
        raise _error(path, f"file too large (over {limit_text(limit)}, the largest image covreport reads)")
    try:
        fh = open_binary(p, "image", limit=limit, error_class=ImageError)
    except ImageError:  # replaced or grown between the two checks
        raise _error(path, "file changed while it was opened (not a regular file of at most "
                           f"{limit_text(limit)})") from None
    try:
        head = fh.read(132)
        fmt = sniff_format(head, path)
        if fmt not in ("PNG", "JPEG", "DICOM"):
            raise _error(path, _not_supported(fmt) if head else "empty file")
        fh.seek(0)
        size = os.fstat(fh.fileno()).st_size
    except BaseException:
        fh.close()
        raise
    return fh, fmt, size


def read_image_bytes(path):
    """The bytes of an image file, after :func:`_open_image`'s checks (magic bytes first).

    Raises :class:`ImageError` (missing, not a regular file, empty, over the
    size limit, not PNG/JPEG/DICOM by its magic bytes, unreadable).
    """
    try:
        fh, _, size = _open_image(path)
        with fh:
            data = fh.read(size + 1)  # the size checked against the limit; one byte more shows growth
    except OSError as exc:
        raise _error(path, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    except MemoryError:
        raise _error(path, "image too large to read in memory") from None
    if len(data) > size:
        raise _error(path, "file changed while it was read (it grew)")
    if not data:
        raise _error(path, "empty file")
    return data


def image_sha256(path):
    """Hex SHA-256 of an image file's bytes, read in chunks after :func:`_open_image`'s checks.

    A file that is not PNG, JPEG or DICOM by its magic bytes, or larger than
    the image limit, is refused before a byte of it is hashed.
    """
    from covreport._io import sha256_file

    try:
        fh, _, _ = _open_image(path)
        with fh:
            return sha256_file(fh)
    except OSError as exc:
        raise _error(path, f"cannot read file ({exc.strerror or type(exc).__name__})") from None


def decode_image(data, name="<bytes>"):
    """Decode image bytes (PNG, JPEG or DICOM); see :func:`load_image`.

    ``name`` is used for format detection (suffix) and in error messages.
    """
    if not data:
        raise _error(name, "empty file")
    fmt = sniff_format(data, name)
    try:
        if fmt == "DICOM":
            arr = _decode_dicom(data, name)
        elif fmt in ("PNG", "JPEG"):
            arr = _decode_pil(data, name, fmt)
        else:
            raise _error(name, _not_supported(fmt))
    except MemoryError:  # never described as something else
        raise _error(name, "image too large to decode in memory") from None
    h, w = arr.shape
    if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
        # Constant wording (no per-file sizes), so the flow diagram counts
        # all such images under one reason.
        raise _error(name, f"image too small (under {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels)")
    if not np.all(np.isfinite(arr)):
        raise _error(name, "image has non-finite pixel values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _too_large(name, limit):
    return _error(name, f"image too large (possible decompression bomb; over {limit} pixels, "
                        "covreport.images.MAX_IMAGE_PIXELS)")


def _check_pixels(name, w, h, frames=1):
    limit = _pixel_limit()
    if w * h * frames > limit:
        raise _too_large(name, limit)


def _pixel_byte_limit():
    return PIXEL_BYTES_PER_PIXEL * _pixel_limit()


def _dicom_pixel_bytes(ds):
    """Bytes the decoded pixel data of ``ds`` take: rows x columns x samples x bytes per sample x frames.

    Raises ValueError (or another error of pydicom) when an attribute is
    missing, malformed or not positive.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if min(rows, cols, frames, samples, bits) < 1:
        raise ValueError("DICOM pixel description not positive")
    return rows * cols * frames * samples * (-(-bits // 8))


def _check_dicom_size(ds, name):
    """Refuse (before any pixel is decoded) a dataset whose pixels would exceed either limit."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        nbytes = _dicom_pixel_bytes(ds)
    except Exception:  # missing or malformed attributes
        raise _error(name, "DICOM pixel description (Rows, Columns) missing or invalid") from None
    _check_pixels(name, cols, rows, frames)
    limit = _pixel_byte_limit()
    if nbytes > limit:
        raise _error(name, f"image too large (possible decompression bomb; decoded pixel data over "
                           f"{limit:,} bytes: rows x columns x samples x bytes per sample, "
                           "covreport.images.MAX_IMAGE_PIXELS)")
    return rows, cols, frames


def _dicom_source(fp, name):
    """``(file, transfer syntax)``: what to give pydicom for the DICOM file open in ``fp``.

    For every transfer syntax but Deflated this is ``fp`` itself (rewound).
    A Deflated dataset is inflated here with a byte cap (pixel-data limit
    plus :data:`DEFLATE_HEADER_ROOM`, checked as it inflates: ``zlib``'s
    ``max_length``) and handed on as an Explicit VR Little Endian file in
    memory; over the cap it is refused.
    """
    import zlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    start = fp.tell()
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        fp.seek(start)
        return fp, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag >> 16 != 2)
        tsyntax = meta.get("TransferSyntaxUID")
    if str(tsyntax or "") != DEFLATED_TRANSFER_SYNTAX:
        fp.seek(start)
        return fp, tsyntax
    cap = _pixel_byte_limit() + DEFLATE_HEADER_ROOM
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            while chunk and len(out) <= cap:
                # At most cap + 1 bytes in all (more means too large), 4 MiB per step.
                out += inflater.decompress(chunk, min(cap + 1 - len(out), 4 << 20))
                chunk = inflater.unconsumed_tail
            if len(out) > cap:
                break
        if len(out) <= cap:
            out += inflater.flush()
    except zlib.error:
        raise _error(name, "unreadable DICOM file (corrupt Deflated dataset)") from None
    if len(out) > cap:
        raise _error(name, f"image too large (possible decompression bomb; the Deflated DICOM dataset "
                           f"inflates to over {cap:,} bytes)")
    meta = FileMetaDataset(meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.write(head)
    write_file_meta_info(buf, meta, enforce_standard=False)
    buf.write(out)
    del out
    buf.seek(0)
    return buf, tsyntax


def _open_pil(fp, fmt):
    """Open with Pillow's ``fmt`` plugin only (PNG or JPEG): no other decoder, no external program."""
    from PIL import Image

    if fmt not in ("PNG", "JPEG"):
        raise ValueError(f"covreport opens only PNG and JPEG with Pillow, not {fmt}")
    return Image.open(fp, formats=[fmt])


def _decode_pil(data, name, fmt):
    from PIL import ImageFile

    # Another library in the process (WeasyPrint does, at import) may have set
    # Pillow's global LOAD_TRUNCATED_IMAGES; a truncated CXR must stay an error.
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        return _decode_pil_strict(data, name, fmt)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _jpeg_draft(im, name, limit):
    """Ask the JPEG decoder for the smallest DCT scale (1/2, 1/4, 1/8) that fits the pixel limit."""
    w, h = im.size
    for scale in (2, 4, 8):
        if (w // scale) * (h // scale) <= limit:
            im.draft(im.mode, (-(-w // scale), -(-h // scale)))
            if im.size[0] * im.size[1] <= limit:
                return
    raise _too_large(name, limit)


def _decode_pil_strict(data, name, fmt):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_pil(io.BytesIO(data), fmt) as im:
                w, h = im.size
                limit = _pixel_limit()
                if w * h > limit:
                    if fmt != "JPEG":
                        raise _too_large(name, limit)
                    _jpeg_draft(im, name, limit)
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception as exc:  # malformed EXIF: keep the stored orientation
                    log.warning("%s: EXIF orientation not applied (%s)", name, type(exc).__name__)
                return _pil_to_gray(im, name)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(name, _pixel_limit()) from None
    except UnidentifiedImageError:
        raise _error(name, _not_supported(None)) from None
    except MemoryError:
        raise _error(name, "image too large to decode in memory") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, ... on junk
        text = str(exc)
        if "truncated" in text or isinstance(exc, EOFError):
            reason = "truncated or corrupt image file"
        else:
            # Not the decoder's text: it can quote bytes of the file (a PNG chunk name).
            reason = f"cannot decode image ({type(exc).__name__})"
        raise _error(name, reason) from None


def _pil_to_gray(im, name):
    mode = im.mode
    if mode in ("L", "1"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return (a / 65535.0).astype(np.float32)
        return _minmax(a)
    if mode == "F":
        return _minmax(np.asarray(im, dtype=np.float64))
    if mode == "LA":
        return np.asarray(im.getchannel("L"), dtype=np.float32) / 255.0
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "RGBa", "La"):
        im = im.convert("RGBA" if mode in ("P", "PA") else "RGB")
        mode = im.mode
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(im, dtype=np.float32)[..., :3]
        # ITU-R 601-2 luma, as Pillow's convert("L"), without 8-bit rounding.
        return (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0
    raise _error(name, f"unsupported image mode {mode!r}")


def _minmax(a):
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi > lo:
        return ((a - lo) / (hi - lo)).astype(np.float32)
    return np.zeros(a.shape, dtype=np.float32)


#: The only DICOM attributes covreport reads (besides the file meta group):
#: the Image Pixel, Modality LUT and VOI LUT modules. Patient and study
#: attributes are never parsed, so no identifier can reach an output, a log
#: line or a warning.
DICOM_PIXEL_TAGS = (
    "SOPClassUID", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "PlanarConfiguration", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "NumberOfFrames", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "RedPaletteColorLookupTableDescriptor", "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
)


def _read_dicom(data, name):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values; we judge the pixels
            try:
                source, tsyntax = _dicom_source(io.BytesIO(data), name)
                ds = pydicom.dcmread(source, specific_tags=list(DICOM_PIXEL_TAGS))
                if tsyntax is not None and str(tsyntax) == DEFLATED_TRANSFER_SYNTAX:
                    ds.file_meta.TransferSyntaxUID = tsyntax  # inflated here; named as in the file
                return ds
            except InvalidDicomError:
                # No preamble/"DICM": may still be a raw dataset; keep it only if it
                # parses to something that describes an image.
                ds = pydicom.dcmread(io.BytesIO(data), force=True,
                                     specific_tags=list(DICOM_PIXEL_TAGS))
                if "Rows" not in ds and "PixelData" not in ds and "SOPClassUID" not in ds:
                    raise _error(name, "not a DICOM file") from None
                return ds
    except (ImageError, MemoryError):
        raise
    except Exception:  # pydicom raises many types on a damaged file
        raise _error(name, "unreadable DICOM file") from None


#: DICOM photometric interpretations covreport decodes.
PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                               "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def _transfer_syntax_text(tsyntax):
    """A transfer syntax for a reason: its standard name and UID, or "an unknown transfer syntax".

    Only UIDs of pydicom's dictionary of transfer syntaxes are named; another
    UID is shown only when well formed (digits and dots), so no text of the
    file is ever copied into a reason.
    """
    from pydicom.uid import UID_dictionary

    uid = str(tsyntax) if tsyntax is not None else ""
    entry = UID_dictionary.get(uid)
    if entry is not None and entry[1] == "Transfer Syntax":
        return f"{entry[0]} ({uid})"
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) and len(uid) <= 64:  # a well-formed UID: digits only
        return f"a private transfer syntax ({uid})"
    return "an unknown transfer syntax"


def _decode_dicom(data, name):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read_dicom(data, name)
    try:
        has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    except Exception:  # pydicom can raise many types on a damaged header
        raise _error(name, "unreadable DICOM file") from None
    if not has_pixels:
        raise _error(name, "DICOM without pixel data")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_text = _transfer_syntax_text(tsyntax)
    rows, cols, frames = _check_dicom_size(ds, name)
    try:
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except Exception:  # malformed attribute
        raise _error(name, "DICOM pixel description (Rows, Columns) missing or invalid") from None
    if frames != 1:
        raise _error(name, "multi-frame DICOM is not supported; export a single frame")
    if photometric not in PHOTOMETRIC_INTERPRETATIONS:
        # The tag's value is not echoed: reasons come from a fixed vocabulary.
        raise _error(name, "unsupported DICOM photometric interpretation (MONOCHROME1, MONOCHROME2, "
                           "RGB or YBR expected)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except NotImplementedError:
        raise _error(
            name, f"cannot decode DICOM pixel data with transfer syntax {ts_text}: "
            f"unsupported by pydicom; {DICOM_DECODER_HINT}"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "missing dependencies" in text:
            reason = (f"cannot decode DICOM pixel data with transfer syntax {ts_text}: "
                      f"no installed decoder; {DICOM_DECODER_HINT}")
        else:
            tried = [line.strip().split(":")[0] for line in text.splitlines()[1:]
                     if ":" in line]
            reason = (f"cannot decode DICOM pixel data with transfer syntax {ts_text}: "
                      f"corrupt data or unsupported by the installed decoders"
                      f"{' (tried ' + ', '.join(tried) + ')' if tried else ''}; "
                      f"{DICOM_DECODER_HINT}")
        raise _error(name, reason) from None
    except MemoryError:
        raise _error(name, "DICOM image too large to decode in memory") from None
    except Exception as exc:  # damaged pixel data raise ValueError, KeyError, ...
        raise _error(
            name, f"cannot decode DICOM pixel data ({ts_text}; {type(exc).__name__})"
        ) from None

    if photometric.startswith(("RGB", "YBR")):
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise _error(name, f"DICOM {photometric} pixel data has shape {arr.shape}")
        # pydicom converts YBR to RGB by default; ITU-R 601 luma, one channel at a
        # time (a float64 copy of the whole RGB array would take 8 bytes per sample).
        gray = np.zeros(arr.shape[:2], dtype=np.float64)
        for k, weight in enumerate((0.299, 0.587, 0.114)):
            gray += weight * arr[..., k]
        bits = int(ds.get("BitsStored", 8) or 8)
        return np.clip(gray / (2 ** bits - 1), 0, 1).astype(np.float32)
    if arr.ndim != 2:
        raise _error(name, f"DICOM pixel data has shape {arr.shape}; a single 2-D frame expected")

    try:
        arr = apply_modality_lut(arr, ds)
        lo_hi = _voi_output_range(ds, arr)
        if lo_hi is not None:
            arr = apply_voi_lut(arr, ds)
    except MemoryError:
        raise
    except Exception as exc:  # inconsistent LUT/window attributes
        raise _error(name, f"invalid DICOM modality or VOI LUT attributes ({type(exc).__name__})") from None
    arr = np.asarray(arr, dtype=np.float64)
    if lo_hi is None:
        out = _minmax(arr)
    else:
        lo, hi = lo_hi
        if hi > lo:
            out = np.clip((arr - lo) / (hi - lo), 0, 1).astype(np.float32)
        else:
            out = np.zeros(arr.shape, dtype=np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def _voi_output_range(ds, arr):
    """Output range ``(lo, hi)`` of the VOI transform pydicom will apply, or None.

    Mirrors :func:`pydicom.pixels.apply_voi_lut` (``prefer_lut=True``): a VOI
    LUT maps to its table's range; a window maps to ``[y_min, y_max]``, found
    by windowing the two extremes (exact for LINEAR, LINEAR_EXACT and SIGMOID).
    """
    from pydicom.pixels import apply_voi_lut

    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        desc = seq[0].LUTDescriptor
        n, first = int(desc[0]) or 2 ** 16, int(desc[1])
        probe = np.arange(first, first + n, dtype=np.int64)
        table = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
        return float(table.min()), float(table.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        with np.errstate(over="ignore"):
            probe = np.array([-1e30, 1e30], dtype=np.float64)
            y = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
        return float(min(y)), float(max(y))
    return None


# --------------------------------------------------------------------------
# To a tensor
# --------------------------------------------------------------------------


def to_tensor(image, preprocessing):
    """Resize, replicate and normalise a greyscale image into a network input.

    Parameters
    ----------
    image : numpy.ndarray
        float32 ``(H, W)`` in ``[0, 1]``, as returned by :func:`load_image`.
    preprocessing : Preprocessing

    Returns
    -------
    torch.Tensor
        float32 ``(channels, size, size)``.
    """
    import torch
    import torch.nn.functional as F

    p = preprocessing
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
    if x.ndim != 2:
        raise ImageError(f"to_tensor expects a 2-D greyscale image, got shape {tuple(x.shape)}")
    x = x[None, None]
    if x.shape[-2:] != (p.size, p.size):
        if p.resize in ("bilinear", "bicubic"):
            x = F.interpolate(x, size=(p.size, p.size), mode=p.resize,
                              align_corners=False, antialias=True)
        else:
            x = F.interpolate(x, size=(p.size, p.size), mode=p.resize)
        if p.resize == "bicubic":
            x = x.clamp_(0.0, 1.0)
    x = x[0].expand(p.channels, p.size, p.size)
    mean = torch.tensor(p.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(p.std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).contiguous()


# --------------------------------------------------------------------------
# Cheap check for manifest validation
# --------------------------------------------------------------------------


def probe_image(path):
    """Cheaply check that ``path`` is a readable image; return ``None`` or the reason.

    Reads the header only (no pixel decoding), so validating a manifest
    stays fast: the file checks of :func:`read_image_bytes` (regular file,
    size limit, magic bytes), then the image's size from its header (for
    DICOM the pixel-data bytes too, with a Deflated dataset inflated under a
    byte cap). The reason is a short phrase for the flow diagram.
    """
    try:
        fh, fmt, _ = _open_image(path)
    except ImageError as exc:
        reason = exc.reason
        if reason.startswith("not a recognised image format"):
            found = reason.split("holds ", 1)[1].split(" data", 1)[0] + ", " if "holds " in reason else ""
            return f"unreadable image ({found}not PNG, JPEG or DICOM)"
        return reason
    with fh:
        try:
            return _probe_dicom(fh, path) if fmt == "DICOM" else _probe_pil(fh, fmt)
        except MemoryError:
            return "image too large to read in memory"
        except OSError as exc:
            return f"cannot read file ({exc.strerror or type(exc).__name__})"


def _probe_dicom(fh, path):
    import pydicom

    try:
        source, _ = _dicom_source(fh, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Only the pixel-description tags; large values (the pixels)
            # are deferred, not read.
            ds = pydicom.dcmread(source, specific_tags=list(DICOM_PIXEL_TAGS), defer_size=1024)
    except ImageError as exc:
        return exc.reason
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types on junk
        return f"unreadable DICOM ({type(exc).__name__})"
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "DICOM without pixel data"
    try:
        _check_dicom_size(ds, path)
    except ImageError as exc:
        return "image too large (possible decompression bomb)" if "too large" in exc.reason else exc.reason
    return None


def _probe_pil(fh, fmt):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_pil(fh, fmt) as im:
                w, h = im.size
                # A JPEG is decoded at up to 1/8 scale (64 times fewer pixels) when too large.
                if w * h > _pixel_limit() * (64 if fmt == "JPEG" else 1):
                    return "image too large (possible decompression bomb)"
                if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
                    return "image too small"
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image too large (possible decompression bomb)"
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many types on junk
        return f"unreadable image ({type(exc).__name__})"
    return None
