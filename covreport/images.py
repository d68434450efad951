"""Image files (PNG, JPEG, DICOM) to normalised arrays."""

from pathlib import Path

DICOM_SUFFIXES = (".dcm", ".dicom")


def probe_image(path):
    """Cheaply check that ``path`` is a readable image; return ``None`` or the reason.

    Reads the header only (no pixel decoding), so validating a manifest
    stays fast. The reason is a short phrase for the flow diagram.
    """
    path = Path(path)
    if not path.exists():
        return "file not found" if not path.is_symlink() else "broken symbolic link"
    if not path.is_file():
        return "not a file"
    if path.stat().st_size == 0:
        return "empty file"
    if path.suffix.lower() in DICOM_SUFFIXES or _is_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on junk
            return f"unreadable DICOM ({type(exc).__name__})"
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            # stop_before_pixels hides PixelData; check the tag list lazily
            ds = pydicom.dcmread(path, specific_tags=["PixelData"])
            if "PixelData" not in ds:
                return "DICOM without pixel data"
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types on junk
        return f"unreadable image ({type(exc).__name__})"
    return None


def _is_dicom(path):
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"
