"""Reliability (issue 13, items 3-6, 9, 10): hostile inputs run nothing and never reach results.

- images: the format is decided by magic bytes; GIF, TIFF, WebP, EPS, ...
  named ``.png`` are refused naming the format; no external program starts
  (Pillow's EPS plugin would run Ghostscript); a huge image is refused
  before its pixels are decoded; a large JPEG is decoded at reduced scale;
- cache rows with out-of-range or non-finite probabilities or the wrong
  number of features are misses: rescored, counted, never used;
- checkpoints with labels that would corrupt the scores file, or
  preprocessing outside its stated ranges, are refused at load;
- a ``--previous`` results.json nested too deep, of the wrong types or with
  out-of-range numbers is refused naming the key;
- invisible direction controls in ids are refused naming line and column;
- exclusion reasons never copy DICOM tag values.
"""

import hashlib
import io
import json
import sqlite3
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from covreport.cache import CacheKey, ScoreCache
from covreport.cli import main
from covreport.errors import ImageError, ManifestError, ModelError, ReportError
from covreport.images import MAX_IMAGE_PIXELS, load_image, probe_image
from covreport.model import load_checkpoint
from covreport.scoring import score_images
from reliability_helpers import LABELS, gradient, make_study, manifest_images, random_scores, write_dicom, write_png

# --------------------------------------------------------------------------
# Item 3: images by magic bytes, no external program, bounded decode memory

EPS_LOOP = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n{ } loop\n%%EOF\n"


def _other_formats(folder):
    """name -> (path, format named in the reason): real files of other formats, all named .png."""
    img = Image.fromarray(gradient((64, 64)))
    files = {}
    for fmt, name in (("GIF", "GIF"), ("TIFF", "TIFF"), ("BMP", "BMP")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        files[f"{fmt.lower()}.png"] = (buf.getvalue(), name)
    try:
        buf = io.BytesIO()
        img.save(buf, "WEBP")
        webp = buf.getvalue()
    except (KeyError, OSError):  # Pillow built without libwebp: the header is what is judged
        webp = b"RIFF" + struct.pack("<I", 100) + b"WEBPVP8 " + b"\0" * 92
    files["webp.png"] = (webp, "WebP")
    files["loop.png"] = (EPS_LOOP, "PostScript/EPS")
    files["dos_eps.png"] = (b"\xc5\xd0\xd3\xc6" + b"\0" * 40 + EPS_LOOP, "EPS")
    out = {}
    for name, (data, fmt) in files.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, fmt)
    return out


@pytest.fixture()
def no_programs(monkeypatch):
    """Record (and block) any attempt to start an external program."""
    import os
    import subprocess

    started = []

    def refuse(*a, **k):
        started.append(a[0] if a else k)
        raise AssertionError(f"an external program was started: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    for name in ("system", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    return started


def test_other_formats_named_png_are_refused_naming_the_format(tmp_path, no_programs):
    for name, (path, fmt) in _other_formats(tmp_path).items():
        t0 = time.perf_counter()
        with pytest.raises(ImageError) as err:
            load_image(path)
        assert f"the file holds {fmt} data" in err.value.reason, (name, err.value.reason)
        assert time.perf_counter() - t0 < 5
        assert probe_image(path) == f"unreadable image ({fmt}, not PNG, JPEG or DICOM)", name
    assert no_programs == []


def test_eps_named_png_through_validate_and_scoring_runs_nothing(tmp_path, no_programs, tiny_loaded):
    manifest = make_study(tmp_path / "s", n_patients=3, images_per_patient=2, seed=1)
    victim = tmp_path / "s" / "images" / "P000_1.png"
    victim.write_bytes(EPS_LOOP)
    res = CliRunner().invoke(main, ["validate", str(manifest)])
    assert "P000_1.png" in res.output and "PostScript/EPS, not PNG, JPEG or DICOM" in res.output, res.output
    scored = score_images([victim], tiny_loaded, num_workers=0)
    (reason,) = scored.failed.values()
    assert reason.startswith("not a recognised image format: the file holds PostScript/EPS data")
    assert no_programs == []


def _png_header(width, height, bit_depth=16):
    """A PNG of ``width x height`` greyscale pixels at ``bit_depth`` whose data holds only 16 rows."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * (width * bit_depth // 8)
    data = zlib.compress(row * 16, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_huge_16_bit_png_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(9400, 9400))  # 88 million pixels, under Pillow's own limit
    assert 9400 * 9400 > MAX_IMAGE_PIXELS
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="possible decompression bomb"):
        load_image(path)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 2 and peak < 20e6, (seconds, peak)  # decoding would take 1 GB and seconds
    assert probe_image(path) == "image too large (possible decompression bomb)"


def test_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    import covreport.images as images

    arr = gradient((400, 480), step=1)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=95)
    full = load_image(path)
    assert full.shape == (400, 480)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 60_000)  # 192,000 pixels: over; at 1/2 scale 48,000
    small = load_image(path)
    assert small.shape == (200, 240)
    # Reference: the full decode averaged over 2x2 blocks (DCT scaling is a block average, within JPEG error).
    blocks = full.reshape(200, 2, 240, 2).mean(axis=(1, 3))
    assert np.abs(small - blocks).mean() < 0.02
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 2_000)  # even 1/8 scale (3,000) is over
    with pytest.raises(ImageError, match="possible decompression bomb"):
        load_image(path)


# --------------------------------------------------------------------------
# Item 4: cached rows are checked


def test_damaged_cache_rows_are_rescored_counted_and_never_used(tmp_path, tiny_loaded):
    rng = np.random.default_rng(7)
    images = [write_png(tmp_path / f"i{k}.png", rng) for k in range(5)]
    fresh = score_images(images, tiny_loaded, num_workers=0)
    db = tmp_path / "c.sqlite"
    with ScoreCache(db) as cache:
        score_images(images, tiny_loaded, cache=cache, num_workers=0)
    bad = {
        0: ("probabilities", np.array([7.5, 0.1, 0.2], "<f4").tobytes()),
        1: ("probabilities", np.array([np.nan, 0.1, 0.2], "<f4").tobytes()),
        2: ("features", np.ones(5, "<f4").tobytes()),
        3: ("probabilities", b"\x01\x02"),  # not even whole float32s
    }
    con = sqlite3.connect(db)
    for k, (column, blob) in bad.items():
        sha = hashlib.sha256(images[k].read_bytes()).hexdigest()
        assert con.execute(f"UPDATE scores SET {column} = ? WHERE image_sha256 = ?", (blob, sha)).rowcount == 1
    con.commit()
    con.close()
    with ScoreCache(db) as cache:
        res = score_images(images, tiny_loaded, cache=cache, num_workers=0)
    assert (res.cache_rows_rejected, res.scored, res.from_cache) == (4, 4, 1)
    assert res.metadata()["cache_rows_rejected"] == 4
    np.testing.assert_array_equal(res.scores[list(LABELS)].to_numpy(), fresh.scores[list(LABELS)].to_numpy())
    with ScoreCache(db) as cache:  # the rows were replaced by the rescored outputs
        again = score_images(images, tiny_loaded, cache=cache, num_workers=0)
    assert (again.cache_rows_rejected, again.scored, again.from_cache) == (0, 0, 5)


def test_run_counts_rejected_cache_rows_in_provenance(tmp_path, tiny_weights):
    manifest = make_study(tmp_path / "s", n_patients=4, images_per_patient=2, seed=2)
    db = tmp_path / "c.sqlite"
    args = ["run", str(manifest), "--weights", str(tiny_weights), "--cache", str(db), "--permutations", "0",
            "--bootstrap", "0", "--no-pdf"]
    assert CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    con = sqlite3.connect(db)
    con.execute("UPDATE scores SET probabilities = ?", (np.array([7.5, 7.5, 7.5], "<f4").tobytes(),))
    con.commit()
    con.close()
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert b["provenance"]["scoring"]["cache_rows_rejected"] == 8
    assert b["provenance"]["scoring"]["images_computed"] == 8
    assert b["pairs"] == a["pairs"]


# --------------------------------------------------------------------------
# Item 5: checkpoint contents


def _variant(tmp_path, tiny_weights, name, **changes):
    payload = torch.load(tiny_weights, map_location="cpu", weights_only=True)
    payload.update(changes)
    path = tmp_path / f"{name}.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("labels, fragment", [
    (["Edema", "image", "Cardiomegaly"], "'image' is a reserved column name"),
    (["Edema", "feat_0000", "Cardiomegaly"], "'feat_0000' is a reserved column name"),
    (["Edema", "", "Cardiomegaly"], "'' is empty or not text"),
    (["Edema", "  ", "Cardiomegaly"], "is empty or not text"),
    (["Edema", "Edema", "Cardiomegaly"], "['Edema'] duplicated"),
    (["Edema", "Pleural\u202eEffusion", "Cardiomegaly"], "labels are printable names"),
])
def test_checkpoint_labels_that_would_corrupt_outputs_are_refused(tmp_path, tiny_weights, labels, fragment):
    path = _variant(tmp_path, tiny_weights, "bad", labels=labels)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "invalid labels" in str(err.value) and fragment in str(err.value)


def test_checkpoint_preprocessing_outside_its_range_is_refused_before_allocating(tmp_path, tiny_weights):
    prep = torch.load(tiny_weights, map_location="cpu", weights_only=True)["preprocessing"]
    path = _variant(tmp_path, tiny_weights, "huge", preprocessing={**prep, "size": 30000})
    tracemalloc.start()
    with pytest.raises(ModelError, match="preprocessing size must be 8 to 2048 pixels, got 30000"):
        load_checkpoint(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200e6
    for bad, fragment in (({"std": [1e-9] * 3}, "std positive"), ({"mean": [1e300] * 3}, "mean must be finite")):
        with pytest.raises(ModelError, match=fragment):
            load_checkpoint(_variant(tmp_path, tiny_weights, "p", preprocessing={**prep, **bad}))
    # Through the CLI: a clear error, no traceback.
    manifest = make_study(tmp_path / "s", n_patients=3, images_per_patient=2)
    res = CliRunner().invoke(main, ["score", str(manifest), "--weights", str(path), "--out", str(tmp_path / "x.csv"),
                                    "--no-cache", "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "size must be" in res.output


# --------------------------------------------------------------------------
# Item 6: --previous results.json


@pytest.fixture(scope="module")
def good_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("prev")
    manifest = make_study(root, n_patients=6, images_per_patient=3, seed=5)
    scores = random_scores(manifest_images(manifest), root / "scores.csv")
    res = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(root / "out"),
                                    "--permutations", "0", "--bootstrap", "0", "--no-pdf"])
    assert res.exit_code == 0, res.output
    return manifest, scores, json.loads((root / "out" / "results.json").read_text())


def _edited(tmp_path, data, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_hostile_previous_results_are_refused_naming_the_key(tmp_path, good_results):
    from covreport.revalidation import load_results

    _, _, good = good_results
    assert load_results(_edited(tmp_path, good))["flow"] == good["flow"]  # an unedited file loads
    cases = {
        "deep": ('{"provenance": {}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than"),
        "deep_valid_depth_50": ('{"provenance": {}, "x": ' + "[" * 50 + "]" * 50 + "}", "nested deeper than 32"),
        "auc_list": ({**good, "validation_auc": [1, 2, "x"]}, "validation_auc[0]: int instead of an object"),
        "p_huge": ({**good, "group_differences": [{**good["group_differences"][0], "p": 1e308}]},
                   "group_differences[0].p: 1e+308 is out of range [0, 1]"),
        "prov_list": ({**good, "provenance": []}, "results.provenance: a list instead of dict"),
        "pairs_str": ({**good, "pairs": "x"}, "results.pairs: text instead of list"),
        "count_neg": ({**good, "flow": {**good["flow"], "pairs_analysed": -3}}, "flow.pairs_analysed: -3 is out"),
        "count_bool": ({**good, "flow": {**good["flow"], "pairs_analysed": True}}, "flow.pairs_analysed: True"),
        "metric": ({**good, "prediction": {**good["prediction"], "nested": {
            **good["prediction"]["nested"], "metrics": {"accuracy": {"estimate": "high"}}}}},
            "prediction.nested.metrics.accuracy.estimate: text instead of"),
    }
    for name, (data, fragment) in cases.items():
        path = _edited(tmp_path, data, f"{name}.json")
        with pytest.raises(ReportError) as err:
            load_results(path)
        assert str(path) in str(err.value) and fragment in str(err.value), (name, str(err.value))


def test_hostile_previous_through_run_is_an_error(tmp_path, good_results):
    manifest, scores, good = good_results
    bad = _edited(tmp_path, {**good, "validation_auc": [1, 2, "x"]})
    res = CliRunner().invoke(main, ["run", str(manifest), "--scores", str(scores), "--out", str(tmp_path / "o"),
                                    "--permutations", "0", "--bootstrap", "0", "--no-pdf", "--previous", str(bad)])
    last = res.output.strip().splitlines()[-1]  # after the stage messages
    assert res.exit_code == 1 and last.startswith("Error: ") and "validation_auc[0]" in last
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------
# Item 9: invisible direction controls in ids


@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200f", "\u200e", "\u061c", "\u200b"])
def test_direction_controls_in_ids_are_refused_naming_line_and_column(tmp_path, char):
    manifest = make_study(tmp_path, n_patients=3, images_per_patient=2,
                          patient_id=lambda p: f"P{p}{char}1" if p == 1 else f"P{p}",
                          pair_id=lambda k: f"pair{k}{char}" if k == 2 else f"pair{k}")
    with pytest.raises(ManifestError) as err:
        from covreport.manifest import read_manifest

        read_manifest(manifest)
    text = str(err.value)
    assert f"line 3, column 'patient_id': 'P1\\u{ord(char):04x}1'" in text, text
    assert f"line 4, column 'pair_id': 'pair2\\u{ord(char):04x}'" in text, text
    assert char not in text  # shown escaped, never raw
    res = CliRunner().invoke(main, ["validate", str(manifest)])
    assert res.exit_code == 1 and "invisible direction-control" in res.output and char not in res.output


# --------------------------------------------------------------------------
# Item 10: exclusion reasons never copy DICOM tag values


def test_exclusion_reasons_never_copy_dicom_tag_values(tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian

    marker = "ZQXTAGVALUE"
    odd = write_dicom(tmp_path / "odd.dcm", photometric=f"{marker}<b>", array=gradient())
    reasons = []
    with pytest.raises(ImageError) as err:
        load_image(odd)
    reasons.append(err.value.reason)
    ts = write_dicom(tmp_path / "ts.dcm", transfer_syntax=f"1.2.{marker}", array=gradient(), junk_pixels=True)
    with pytest.raises(ImageError) as err:
        load_image(ts)
    reasons.append(err.value.reason)
    assert reasons[0] == ("unsupported DICOM photometric interpretation (MONOCHROME1, MONOCHROME2, RGB or YBR "
                          "expected)")
    for reason in reasons:
        assert marker not in reason and "<b>" not in reason, reason
    ok = write_dicom(tmp_path / "ok.dcm", transfer_syntax=ExplicitVRLittleEndian, array=gradient())
    assert load_image(ok).shape == gradient().shape
