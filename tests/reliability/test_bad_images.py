"""Reliability: awkward image files are read correctly or refused with their reason.

Each file goes through :func:`covreport.images.load_image` (full decode) and
:func:`covreport.images.probe_image` (the manifest's header check), then the
whole set through :func:`covreport.scoring.score_images` with a tiny
DenseNet121 and through :func:`covreport.manifest.read_manifest`: a bad
image becomes a ``failed`` entry / an exclusion with its reason, never a
crash; ``strict`` turns it into an error.

Pixel references are independent of covreport's decoder: Pillow's own
``convert("RGB")`` with the ITU-R 601 luma weights, ``numpy.rot90`` for EXIF
orientation 6 (DICOM PS3.3 / EXIF 2.3: "rotate 90 degrees clockwise to
display"), and the raw stored values for 16-bit PNG and DICOM.
"""

import os

import numpy as np
import pytest
from PIL import Image

from covreport.cache import ScoreCache
from covreport.errors import ImageError, ManifestError
from covreport.images import load_image, probe_image
from covreport.manifest import read_manifest
from covreport.scoring import score_images
from reliability_helpers import bomb_png, gradient, write_dicom

LUMA = np.array([0.299, 0.587, 0.114])


def _jpeg_bytes(array, **kw):
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png_bytes(array, mode=None):
    import io

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG") if mode else Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _pil_luma(path):
    """Reference grey level: Pillow decodes and converts to RGB; luma in float."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    return rgb @ LUMA / 255.0


def build_cases(folder):
    """name -> path of every awkward file (and a few good ones)."""
    from pydicom.uid import JPEG2000Lossless

    rng = np.random.default_rng(7)
    g = gradient()
    noise = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "empty.png": b"",
        "truncated.jpg": _jpeg_bytes(noise)[:600],
        "truncated.png": _png_bytes(noise)[:2000],
        "text.png": b"patient_id,first_image\nthis is text, not an image\n",
        "one_pixel.png": _png_bytes(np.array([[128]], dtype=np.uint8)),
        "bomb.png": bomb_png(100_000, 100_000),
        "bomb_2x_limit.png": bomb_png(12_000, 12_000),  # between the limit and twice it: Pillow only warns
        "gray8.png": _png_bytes(g),
        "gray16.png": _png_bytes((g.astype(np.uint16) * 257)),
        "rgba.png": _png_bytes(np.dstack([g, 255 - g, g // 2, np.full_like(g, 9)]), "RGBA"),
        "gray.jpg": _jpeg_bytes(g),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    Image.fromarray(np.dstack([g, 255 - g, g // 2])).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "palette.png")
    Image.fromarray(np.dstack([g, g // 2, 255 - g, g // 3]).astype(np.uint8), "CMYK").save(
        folder / "cmyk.jpg", quality=95)
    im = Image.fromarray(g)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    im.save(folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    os.symlink(folder / "gone.png", folder / "broken_link.png")
    (folder / "folder.png").mkdir()
    for name in ("palette.png", "cmyk.jpg", "exif_rotated.jpg", "broken_link.png", "folder.png"):
        paths[name] = folder / name
    paths["ok.dcm"] = write_dicom(folder / "ok.dcm", marker="ZQXSECRET")
    paths["monochrome1.dcm"] = write_dicom(folder / "monochrome1.dcm", photometric="MONOCHROME1")
    paths["no_pixels.dcm"] = write_dicom(folder / "no_pixels.dcm", pixels=False, marker="ZQXSECRET")
    paths["jpeg2000_junk.dcm"] = write_dicom(folder / "jpeg2000_junk.dcm", transfer_syntax=JPEG2000Lossless,
                                             junk_pixels=True, marker="ZQXSECRET")
    paths["bomb.dcm"] = write_dicom(folder / "bomb.dcm", rows=60_000, columns=60_000)
    paths["short_pixels.dcm"] = write_dicom(folder / "short_pixels.dcm", rows=400, columns=500)
    dcm = paths["ok.dcm"].read_bytes()
    (folder / "truncated.dcm").write_bytes(dcm[: len(dcm) // 2])
    paths["truncated.dcm"] = folder / "truncated.dcm"
    return paths


#: name -> fragment of load_image's reason. Files not listed load.
BAD = {
    "empty.png": "empty file",
    "truncated.jpg": "truncated or corrupt image file",
    "truncated.png": "truncated or corrupt image file",
    "text.png": "not a recognised image format",
    "one_pixel.png": "image too small (under 16x16 pixels)",
    "bomb.png": "possible decompression bomb",
    "bomb_2x_limit.png": "possible decompression bomb",
    "broken_link.png": "broken symbolic link",
    "folder.png": "not a file",
    "no_pixels.dcm": "DICOM without pixel data",
    "jpeg2000_junk.dcm": "cannot decode DICOM pixel data with transfer syntax JPEG 2000",
    "bomb.dcm": "possible decompression bomb",
    "short_pixels.dcm": "cannot decode DICOM pixel data",
    "truncated.dcm": "cannot decode DICOM pixel data",
}
#: name -> fragment of probe_image's reason, where the header alone shows the problem.
PROBE_BAD = {
    "empty.png": "empty file", "truncated.png": "unreadable image", "text.png": "unreadable image",
    "one_pixel.png": "image too small", "bomb.png": "decompression bomb",
    "bomb_2x_limit.png": "decompression bomb", "broken_link.png": "broken symbolic link",
    "folder.png": "not a file", "no_pixels.dcm": "DICOM without pixel data",
    "bomb.dcm": "decompression bomb",  # the header's size, checked without decoding (issue 18)
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return build_cases(tmp_path_factory.mktemp("awkward"))


def test_every_case_is_covered(cases):
    assert set(BAD) <= set(cases) and set(PROBE_BAD) <= set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_an_image_error_with_reason(cases, name):
    path = cases[name]
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert BAD[name] in err.value.reason
    assert str(err.value) == f"{path}: {err.value.reason}"
    assert "ZQXSECRET" not in str(err.value)  # no DICOM identifier in messages
    probed = probe_image(path)
    if name in PROBE_BAD:
        assert probed is not None and PROBE_BAD[name] in probed
    else:  # the header looks fine; the full decode (at scoring) finds the problem
        assert probed is None or isinstance(probed, str)
    assert probed is None or "ZQXSECRET" not in probed


def test_decompression_bomb_is_refused_before_allocation(cases):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("bomb.png", "bomb_2x_limit.png", "bomb.dcm"):
        with pytest.raises(ImageError):
            load_image(cases[name])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB decoding bombs"


def test_good_files_decode_to_reference_pixels(cases):
    g = gradient().astype(np.float64)
    expected = {
        "gray8.png": g / 255,
        "gray16.png": g * 257 / 65535,
        "rgba.png": np.dstack([g, 255 - g, g // 2]) @ LUMA / 255,  # alpha dropped
        "palette.png": _pil_luma(cases["palette.png"]),
        "cmyk.jpg": _pil_luma(cases["cmyk.jpg"]),
        "exif_rotated.jpg": np.rot90(_pil_luma(cases["exif_rotated.jpg"]), k=-1),  # clockwise
        "gray.jpg": _pil_luma(cases["gray.jpg"]),
    }
    stored = gradient().astype(np.float64) * 16  # the DICOM's stored values, no window: min-max
    expected["ok.dcm"] = (stored - stored.min()) / (stored.max() - stored.min())
    expected["monochrome1.dcm"] = 1 - expected["ok.dcm"]
    for name, ref in expected.items():
        arr = load_image(cases[name])
        assert arr.dtype == np.float32 and arr.shape == ref.shape, name
        np.testing.assert_allclose(arr, ref, atol=2e-6, err_msg=name)
        assert probe_image(cases[name]) is None, name
    assert load_image(cases["exif_rotated.jpg"]).shape == (50, 40)  # stored 40 x 50


def test_scoring_turns_bad_files_into_failed_entries(cases, tiny_loaded, tmp_path, workers=0):
    # In this process; the pipeline test below goes through the DataLoader worker processes.
    mapping = {name: path for name, path in sorted(cases.items())}
    with ScoreCache(tmp_path / "cache.sqlite") as cache:
        res = score_images(mapping, tiny_loaded, cache=cache, batch_size=4, num_workers=workers)
    assert set(res.failed) == set(BAD)
    for name, reason in res.failed.items():
        assert BAD[name] in reason, (name, reason)
        assert "ZQXSECRET" not in reason
    good = sorted(set(cases) - set(BAD))
    assert res.scores["image"].tolist() == good
    values = res.scores.drop(columns="image").to_numpy()
    assert np.isfinite(values).all()
    assert res.scored + res.from_cache == len(good)


def test_manifest_turns_bad_files_into_exclusions_or_strict_errors(cases, tmp_path):
    folder = cases["gray8.png"].parent
    names = sorted(cases)
    good = "gray8.png"
    rows = ["pair_id,patient_id,first_image,second_image,outcome"]
    rows += [f"{name},P0,{good},{name},Worse" for name in names if name != good]
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    try:
        m = read_manifest(manifest)
        excluded = dict(zip(m.exclusions["pair_id"], m.exclusions["reason"]))
        for name in names:
            if name == good:
                continue
            if name in PROBE_BAD:  # the manifest sees it: an exclusion with the reason and the file
                assert excluded[name] == f"second image: {probe_image(cases[name])} ({name})"
            else:  # found at scoring (see the scoring test), not by the header check
                assert name not in excluded
        assert set(m.exclusions["stage"]) == {"index test not done"}
        with pytest.raises(ManifestError) as err:
            read_manifest(manifest, strict=True)
        text = str(err.value)
        assert f"{len(PROBE_BAD)} problems" in text
        for name in PROBE_BAD:
            assert f"'{name}'" in text
        assert "ZQXSECRET" not in text
    finally:
        manifest.unlink()


def test_pipeline_counts_each_bad_image_as_an_exclusion_with_its_reason(cases, tiny_weights, tmp_path):
    import json

    from click.testing import CliRunner

    from covreport.cli import main
    from reliability_helpers import make_study, write_png

    folder = cases["gray8.png"].parent
    manifest = make_study(folder / "study", n_patients=6, images_per_patient=3, seed=2)
    rng = np.random.default_rng(5)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    for k, name in enumerate(sorted(BAD)):
        first = write_png(folder / "study" / f"first_{k}.png", rng)
        lines.append(f"bad{k},B{k},{first.name},../{name},Worse,,,,,")
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["run", str(manifest), "--weights", str(tiny_weights), "--cache", str(tmp_path / "c.sqlite"),
            "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    flow = results["flow"]
    reasons = {e["pair_id"]: e["reason"] for e in flow["exclusions"]}
    assert flow["pairs_in_manifest"] == 12 + len(BAD) and flow["pairs_analysed"] == 12
    for k, name in enumerate(sorted(BAD)):
        reason = reasons[f"bad{k}"]
        expected = PROBE_BAD.get(name, BAD[name])
        assert reason.startswith("second image: ") and expected in reason and f"../{name})" in reason, reason
    assert sum(c["pairs"] for c in flow["exclusion_counts"]) == len(BAD)
    assert {c["stage"] for c in flow["exclusion_counts"]} == {"index test not done"}
    html = (out / "report.html").read_text(encoding="utf-8")
    for fragment in ("decompression bomb", "DICOM without pixel data", "broken symbolic link", "JPEG 2000"):
        assert fragment in html, fragment
    # --strict: the same files are errors, and nothing is written.
    strict = CliRunner().invoke(main, args[:-1] + [str(tmp_path / "strict"), "--strict"])
    assert strict.exit_code == 1 and strict.output[strict.output.find("Error: "):].startswith("Error: ") and "Traceback" not in strict.output
    assert not (tmp_path / "strict").exists()
    for name in PROBE_BAD:
        assert name in strict.output, name
