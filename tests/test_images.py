"""Tests of covreport.images: every image mode, DICOM handling, bad files, preprocessing.

Independent references: pixel values are the ones written (Pillow and pydicom
write the files; expected values are computed by hand from the written
arrays), Pillow's own ``Image.resize`` for the antialiased resize, and the
DICOM standard's window formula (PS3.3 C.11.2.1.2) computed by hand.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from covreport.errors import ImageError, ModelError
from covreport.images import (
    MIN_IMAGE_SIDE, Preprocessing, decode_image, load_image, probe_image, to_tensor,
)

pydicom = pytest.importorskip("pydicom")


def _gradient(h=48, w=64, maxval=255, dtype=np.uint8):
    """A horizontal ramp 0..maxval (exact integers)."""
    row = np.round(np.linspace(0, maxval, w)).astype(dtype)
    return np.tile(row, (h, 1))


# --------------------------------------------------------------------------
# PNG / JPEG modes
# --------------------------------------------------------------------------


def test_png_l_8bit(tmp_path):
    a = _gradient()
    Image.fromarray(a, "L").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == a.shape
    np.testing.assert_allclose(out, a / 255.0, atol=1e-7)


def test_png_16bit(tmp_path):
    a = _gradient(maxval=65535, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode.startswith("I")  # 16-bit greyscale, as Pillow reads it back
    np.testing.assert_allclose(load_image(tmp_path / "a.png"), a / 65535.0, atol=1e-6)


def test_mode_i_32bit(tmp_path):
    # PNG and JPEG never decode to 32-bit "I" (only TIFF does, which covreport refuses):
    # the conversion itself is still exact.
    from covreport.images import _pil_to_gray

    a = _gradient(maxval=40000, dtype=np.int32)
    np.testing.assert_allclose(_pil_to_gray(Image.fromarray(a, "I"), "a"), a / 65535.0, atol=1e-6)
    Image.fromarray(a, "I").save(tmp_path / "a.tif")
    with pytest.raises(ImageError, match="holds TIFF data"):
        load_image(tmp_path / "a.tif")


def test_png_rgb_and_rgba_use_luma(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    # ITU-R 601-2 luma, the weights of Pillow's convert("L") (Pillow docs)
    luma = (rgb.astype(float) @ [0.299, 0.587, 0.114]) / 255
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.png"), luma, atol=1e-5)
    rgba = np.dstack([rgb, np.full((32, 40), 77, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png"), luma, atol=1e-5)
    # Pillow's own 8-bit conversion agrees within rounding
    np.testing.assert_allclose(
        load_image(tmp_path / "rgb.png"),
        np.asarray(Image.fromarray(rgb).convert("L"), float) / 255, atol=1 / 255 + 1e-6)


def test_png_palette(tmp_path):
    a = _gradient(maxval=255)
    im = Image.fromarray(a, "L").convert("P")
    im.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as back:
        assert back.mode == "P"
        expected = np.asarray(back.convert("L"), float) / 255
    np.testing.assert_allclose(load_image(tmp_path / "p.png"), expected, atol=1 / 255)


def test_jpeg_l_rgb_cmyk(tmp_path):
    a = np.full((40, 40), 128, np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "l.jpg", quality=95)
    np.testing.assert_allclose(load_image(tmp_path / "l.jpg"), 128 / 255, atol=2 / 255)
    Image.fromarray(np.dstack([a, a, a]), "RGB").save(tmp_path / "rgb.jpeg", quality=95)
    np.testing.assert_allclose(load_image(tmp_path / "rgb.jpeg"), 128 / 255, atol=2 / 255)
    # CMYK (0, 0, 0, 127) is mid grey: Pillow's CMYK->RGB gives 255 - K = 128
    cmyk = np.zeros((40, 40, 4), np.uint8)
    cmyk[..., 3] = 127
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    np.testing.assert_allclose(load_image(tmp_path / "cmyk.jpg"), 128 / 255, atol=3 / 255)


def test_exif_orientation_applied(tmp_path):
    # 40 wide, 20 high, white block in the top-left corner
    a = np.zeros((20, 40), np.uint8)
    a[:5, :5] = 255
    im = Image.fromarray(a, "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20)
    # After a clockwise quarter turn the top-left block sits top-right.
    assert out[:5, -5:].mean() > 0.9 and out[:5, :5].mean() < 0.1


# --------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------


def _png_header_only(width, height):
    """A syntactically valid PNG signature + IHDR claiming width x height."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("patient_id,first_image\n1,a.png\n"), "not a recognised image format"),
    (lambda p: Image.fromarray(np.zeros((1, 1), np.uint8)).save(p), "image too small"),
    (lambda p: p.write_bytes(_png_header_only(100_000, 100_000)), "decompression bomb"),
])
def test_bad_png_files(tmp_path, make, reason):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(ImageError) as info:
        load_image(p)
    assert str(info.value).startswith(f"{p}: ")
    assert reason in str(info.value) and reason in info.value.reason
    assert probe_image(p) is not None


def test_decompression_bomb_under_the_pil_limit(tmp_path, monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice it Pillow only warns: that must fail too.
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8)).save(buf, fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(p)


def test_missing_and_broken_symlink(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_image(tmp_path / "link.png")


def test_min_side_is_enforced_exactly(tmp_path):
    Image.fromarray(np.zeros((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), np.uint8)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").shape == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)
    Image.fromarray(np.zeros((MIN_IMAGE_SIDE - 1, 50), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(ImageError, match="too small"):
        load_image(tmp_path / "thin.png")


# --------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid  # noqa: E402

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "MRN-4417-SECRET"


def _dicom(arr, photometric="MONOCHROME2", bits=12, **attrs):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, PATIENT_ID, "CR"
    if arr is not None:
        ds.set_pixel_data(arr, photometric, bits)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _save(ds, path, **kw):
    ds.save_as(path, enforce_file_format=True, **kw)
    return path


def test_dicom_monochrome2_minmax(tmp_path):
    a = _gradient(maxval=4000, dtype=np.uint16) + 95  # 95..4095
    out = load_image(_save(_dicom(a), tmp_path / "m2.dcm"))
    np.testing.assert_allclose(out, (a - 95) / 4000.0, atol=1e-6)


def test_dicom_monochrome1_loads_inverted(tmp_path):
    a = _gradient(maxval=4000, dtype=np.uint16) + 95
    m2 = load_image(_save(_dicom(a, "MONOCHROME2"), tmp_path / "m2.dcm"))
    m1 = load_image(_save(_dicom(a, "MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[:, 0].mean() == pytest.approx(1.0) and m1[:, -1].mean() == pytest.approx(0.0)


def test_dicom_rescale_then_window(tmp_path):
    # Stored 0..1000; modality = 2 * stored - 1000 in [-1000, 1000].
    a = np.tile(np.array([0, 250, 375, 500, 625, 750, 1000], np.uint16), (20, 3))
    ds = _dicom(a, bits=12, RescaleSlope=2, RescaleIntercept=-1000,
                WindowCenter=0, WindowWidth=1001)
    out = load_image(_save(ds, tmp_path / "w.dcm"))
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR), by hand: x <= c - 0.5 - (w-1)/2 -> 0,
    # x > c - 0.5 + (w-1)/2 -> 1, else ((x - (c - 0.5)) / (w - 1) + 0.5).
    modality = 2.0 * a[0, :7] - 1000
    c, w = 0.0, 1001.0
    expected = np.clip((modality - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    expected[modality <= c - 0.5 - (w - 1) / 2] = 0
    expected[modality > c - 0.5 + (w - 1) / 2] = 1
    np.testing.assert_allclose(out[0, :7], expected, atol=1e-6)
    # Without the rescale the same window would give all-white: the rescale matters.
    assert out[0, 1] == pytest.approx(0.0, abs=1e-3) and out[0, 3] == pytest.approx(0.5, abs=1e-3)


def test_dicom_voi_lut_sequence(tmp_path):
    a = np.tile(np.arange(0, 64, dtype=np.uint16), (20, 1))  # 20 x 64
    item = Dataset()
    item.LUTDescriptor = [64, 0, 8]           # 64 entries, first mapped 0, 8 bits
    lut = (255 - 4 * np.arange(64)).astype(np.uint16)  # a decreasing table 255..3
    item.LUTData = lut.tolist()
    ds = _dicom(a, bits=8)
    ds.VOILUTSequence = [item]
    ds["VOILUTSequence"][0]["LUTData"].VR = "US"
    out = load_image(_save(ds, tmp_path / "lut.dcm"))
    # output = LUT[value], scaled by the table's range [3, 255]
    np.testing.assert_allclose(out[0], (lut - 3) / 252.0, atol=1e-6)


def test_dicom_without_pixel_data(tmp_path):
    p = _save(_dicom(None), tmp_path / "nopix.dcm")
    with pytest.raises(ImageError, match="DICOM without pixel data"):
        load_image(p)
    assert probe_image(p) == "DICOM without pixel data"


def test_dicom_unsupported_compression_names_transfer_syntax(tmp_path):
    ds = _dicom(_gradient(dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
    p = _save(ds, tmp_path / "jls.dcm")
    with pytest.raises(ImageError) as info:
        load_image(p)
    msg = str(info.value)
    assert "JPEG-LS Lossless" in msg and "1.2.840.10008.1.2.4.80" in msg
    assert "pip install" in msg
    assert PATIENT_NAME not in msg and PATIENT_ID not in msg


def test_dicom_private_transfer_syntax(tmp_path):
    ds = _dicom(_gradient(dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    p = _save(ds, tmp_path / "private.dcm", implicit_vr=False, little_endian=True)
    with pytest.raises(ImageError, match=r"1\.2\.3\.4\.5\.6\.7.*unsupported by pydicom"):
        load_image(p)


def test_dicom_detected_by_magic_without_suffix(tmp_path):
    a = _gradient(maxval=4000, dtype=np.uint16)
    p = _save(_dicom(a), tmp_path / "image_without_suffix")
    np.testing.assert_allclose(load_image(p), a / 4000.0, atol=1e-6)


def test_dicom_junk_and_identifiers_never_in_messages(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"this is not DICOM at all" * 10)
    with pytest.raises(ImageError, match="not a DICOM file|unreadable DICOM"):
        load_image(tmp_path / "junk.dcm")
    ds = _dicom(np.zeros((4, 4), np.uint16))  # too small
    p = _save(ds, tmp_path / "tiny.dcm")
    with pytest.raises(ImageError) as info:
        load_image(p)
    assert "too small" in str(info.value)
    assert PATIENT_NAME not in str(info.value) and PATIENT_ID not in str(info.value)


def test_dicom_identifiers_are_never_parsed_logged_or_warned(tmp_path, caplog, recwarn):
    from covreport.images import _read_dicom

    secret = "ZQXSECRET" * 10  # too long for a PN component: pydicom would warn with the value
    a = _gradient(maxval=4000, dtype=np.uint16)
    ds = _dicom(a)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = secret, secret[:60], "19700101"
    p = tmp_path / "id.dcm"
    ds.save_as(p, enforce_file_format=True)
    caplog.set_level("DEBUG")
    out = load_image(p)
    np.testing.assert_allclose(out, a / 4000.0, atol=1e-6)
    parsed = _read_dicom(p.read_bytes(), "id.dcm")
    assert "PatientName" not in parsed and "PatientID" not in parsed
    assert "PatientBirthDate" not in parsed
    assert "ZQXSECRET" not in caplog.text
    assert not any("ZQXSECRET" in str(w.message) for w in recwarn)


def test_decode_image_from_bytes_matches_file(tmp_path):
    a = _gradient()
    Image.fromarray(a).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    np.testing.assert_array_equal(decode_image(data, "a.png"), load_image(tmp_path / "a.png"))


# --------------------------------------------------------------------------
# Preprocessing and to_tensor
# --------------------------------------------------------------------------


def test_preprocessing_round_trip_and_signature():
    p = Preprocessing()
    assert p.size == 320 and p.resize == "bilinear" and p.channels == 3
    assert Preprocessing.from_dict(p.to_dict()) == p
    assert Preprocessing.from_dict({**p.to_dict(), "mean": [0.485, 0.456, 0.406]}).signature() \
        == p.signature()
    assert Preprocessing(size=224).signature() != p.signature()
    assert Preprocessing(resize="bicubic").signature() != p.signature()
    assert len(p.signature()) == 16 and p.signature() == Preprocessing().signature()
    with pytest.raises(ModelError, match="unknown preprocessing field"):
        Preprocessing.from_dict({**p.to_dict(), "crop": "center"})
    with pytest.raises(ModelError, match="one mean and one std per channel"):
        Preprocessing(channels=1)
    with pytest.raises(ModelError, match="std positive"):
        Preprocessing(std=(0.2, 0.0, 0.2))


def test_to_tensor_normalises_and_replicates():
    p = Preprocessing(size=32)
    t = to_tensor(np.full((50, 70), 0.5, np.float32), p)
    assert t.shape == (3, 32, 32) and t.dtype.is_floating_point
    for c in range(3):
        np.testing.assert_allclose(t[c].numpy(), (0.5 - p.mean[c]) / p.std[c], atol=1e-5)
    one = to_tensor(np.full((40, 40), 0.25, np.float32),
                    Preprocessing(size=16, mean=(0.5,), std=(0.25,), channels=1))
    assert one.shape == (1, 16, 16)
    np.testing.assert_allclose(one.numpy(), -1.0, atol=1e-6)


def test_to_tensor_resize_matches_pillow_antialiased_bilinear():
    rng = np.random.default_rng(3)
    img = rng.random((200, 150)).astype(np.float32)
    p = Preprocessing(size=64, mean=(0.0,), std=(1.0,), channels=1)
    ours = to_tensor(img, p)[0].numpy()
    # Reference: Pillow's antialiased bilinear resize on a float ("F") image.
    ref = np.asarray(Image.fromarray(img, "F").resize((64, 64), Image.BILINEAR))
    np.testing.assert_allclose(ours, ref, atol=2e-3)


# --------------------------------------------------------------------------
# Fuzz: damaged files only ever raise ImageError
# --------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _valid_files():
    a = _gradient(h=32, w=32)
    out = {}
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg")):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, fmt)
        out[suffix] = buf.getvalue()
    buf = io.BytesIO()
    _dicom(_gradient(h=32, w=32, maxval=4000, dtype=np.uint16)).save_as(buf, enforce_file_format=True)
    out[".dcm"] = buf.getvalue()
    return out


_VALID = _valid_files()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from(sorted(_VALID)), data=st.data())
def test_damaged_bytes_raise_only_image_error(suffix, data):
    raw = bytearray(_VALID[suffix])
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)),
                               max_size=8))
    for pos, val in flips:
        raw[pos] = val
    blob = bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw)
    try:
        out = decode_image(blob, f"fuzz{suffix}")
    except ImageError as exc:
        assert str(exc).startswith(f"fuzz{suffix}: ") and exc.reason
    else:
        assert out.dtype == np.float32 and out.ndim == 2
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_truncated_stays_an_error_after_weasyprint_sets_pillows_global(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as `import weasyprint` does
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 200), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path / "cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
