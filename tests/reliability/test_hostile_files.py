"""Reliability (issue 18, sections 3, 5 and 6): hostile scores files, checkpoints and images.

- scores files: a column name written twice is refused as written (pandas
  would read the copy as a label ``Edema.1``); a feature float32 cannot hold
  (``1e39``) is refused by the reader, and rows are named by the file's line;
  label names with invisible characters are refused; thousands of extra
  columns are read in linear time;
- checkpoints: non-finite weights are refused at load naming the tensor;
  every network output is checked (a non-finite one makes the image an
  exclusion with its reason); the unpacked size of the archive is bounded
  before ``torch.load``, and tensors in the metadata are refused;
- images: regular file, size limit and magic bytes are checked before a file
  is hashed or decoded; DICOM pixel data are bounded by rows x columns x
  samples x bytes, and a Deflated dataset is inflated under a byte cap;
- memory errors become the reader's own error, never a traceback or another
  description; values echoed from inputs have their control characters escaped.

Memory is measured in a child process: the growth of its peak resident size
(``VmHWM``) while the input is read, against 300 MB.
"""

import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from covreport.cli import main
from covreport.constants import feature_columns
from covreport.errors import ImageError, ModelError, ScoresError
from covreport.images import load_image, probe_image
from covreport.model import load_checkpoint
from covreport.scores_file import read_scores
from covreport.scoring import score_images
from reliability_helpers import LABELS, REPO, make_study, subprocess_env, write_png

MEMORY_LIMIT_MB = 300  # growth of the peak resident size while the input is read


def _peak_mb(tmp_path, setup, code):
    """Run ``setup`` then ``code`` (which may print) in a fresh interpreter.

    Returns (what ``code`` printed, MB by which the peak resident size grew
    while ``code`` ran, above the resident size after ``setup``: the imports,
    torch's alone take some 500 MB). Peak from ``VmHWM``, this process
    image's own (``ru_maxrss`` would carry the parent's over fork and exec).
    """
    script = "\n".join([
        textwrap.dedent(setup),
        "rss_kb = int([l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1])",
        "print('---')",
        textwrap.dedent(code),
        "hwm_kb = int([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1])",
        "print('GROWTH_KB', hwm_kb - rss_kb)",
    ])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(tmp_path), cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().split("---\n", 1)[1].splitlines()
    assert lines[-1].startswith("GROWTH_KB "), proc.stdout
    return "\n".join(lines[:-1]), int(lines[-1].split()[1]) / 1024


# --------------------------------------------------------------------------
# Scores files (section 3)


def _scores(path, n=3, labels=LABELS, feats=True, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"image": [f"img/{i}.png" for i in range(n)]})
    for lab in labels:
        df[lab] = rng.random(n)
    if feats:
        df = pd.concat([df, pd.DataFrame(rng.gamma(1.0, 1.0, (n, 1024)), columns=feature_columns())], axis=1)
    df.to_csv(path, index=False)
    return path


def test_a_label_column_written_twice_is_refused_as_written(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("image,Edema,Edema\na.png,0.1,0.2\nb.png,0.3,0.4\n")
    # pandas alone renames the copy: the reader must look at the header itself.
    assert list(pd.read_csv(p).columns) == ["image", "Edema", "Edema.1"]
    with pytest.raises(ScoresError) as err:
        read_scores(p)
    assert str(err.value) == (f"scores file {p}: columns 2 and 3 of the header (line 1) are both named 'Edema' "
                              "-- each column needs its own name; delete or rename the copy")
    # Also where the copy is a feature column, or the image column.
    df = pd.read_csv(_scores(tmp_path / "f.csv"))
    text = (tmp_path / "f.csv").read_text().splitlines()
    (tmp_path / "f2.csv").write_text("\n".join([text[0] + ",feat_0003"] + [r + ",0.5" for r in text[1:]]) + "\n")
    with pytest.raises(ScoresError, match="columns 8 and 1029 of the header .* 'feat_0003'"):
        read_scores(tmp_path / "f2.csv")
    (tmp_path / "i.csv").write_text("image,Edema,image\na.png,0.1,b.png\n")
    with pytest.raises(ScoresError, match="columns 1 and 3 .* 'image'"):
        read_scores(tmp_path / "i.csv")
    assert len(df) == 3


def test_a_header_cell_with_no_name_is_refused(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text(",image,Edema\n0,a.png,0.1\n")  # pandas' to_csv(index=True): "Unnamed: 0" as a label
    with pytest.raises(ScoresError, match=r"column 1 of the header \(line 1\) has no name"):
        read_scores(p)


def test_a_feature_float32_cannot_hold_is_refused_by_the_reader_on_its_line(tmp_path):
    p = _scores(tmp_path / "s.csv")
    lines = p.read_text().splitlines()
    cells = lines[2].split(",")
    cells[4 + 5] = "1e39"  # image + 3 labels, then feat_0005 of the second data row (line 3)
    lines[2] = ",".join(cells)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScoresError) as err:
        read_scores(p, require_features=True)
    assert f"scores file {p}, line 3, column 'feat_0005': 1e+39 is not a finite number" in str(err.value)
    assert "float32" in str(err.value) and "-- re-score that image" in str(err.value)
    # 3.4e38 (float32's largest) is still a number.
    cells[4 + 5] = "3.4e38"
    lines[2] = ",".join(cells)
    p.write_text("\n".join(lines) + "\n")
    assert np.isfinite(read_scores(p)["feat_0005"]).all()


def test_rows_are_named_by_the_files_lines(tmp_path):
    # Blank lines (skipped by pandas) and a quoted cell holding a line break shift
    # the data rows: the message names the line a text editor shows (line 7).
    p = tmp_path / "s.csv"
    p.write_text('image,Edema\n\na.png,0.1\n"b\nc.png",0.3\n\nd.png,1.5\n')
    with pytest.raises(ScoresError, match=r"line 7, column 'Edema': 1.5 is not a probability in \[0, 1\]"):
        read_scores(p)
    p.write_text("image,Edema\na.png,0.1\n\nb.png,0.2\na.png,0.3\n")
    with pytest.raises(ScoresError, match="line 5: image 'a.png' appears more than once"):
        read_scores(p)
    p.write_text("\nimage,Edema\n,0.1\n")
    with pytest.raises(ScoresError, match="line 3: empty 'image'"):
        read_scores(p)


def test_many_extra_columns_are_read_without_per_column_frame_growth(tmp_path):
    # The quadratic reader inserted one column at a time (pandas warns past 100
    # inserts: "DataFrame is highly fragmented") and counted duplicates with
    # list.count per column. benchmarks/bench_scores_wide.py measures the time.
    n = 400
    p = tmp_path / "wide.csv"
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.random((4, n)), columns=[f"L{i:04d}" for i in range(n)])
    df.insert(0, "image", [f"i{k}.png" for k in range(4)])
    df.to_csv(p, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        back = read_scores(p)
    assert back.shape == (4, n + 1)
    np.testing.assert_array_equal(back.iloc[:, 1:].to_numpy(), df.iloc[:, 1:].to_numpy())  # exact round trip


def test_scores_labels_and_values_cannot_hide_or_act_on_the_terminal(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("image,Ede\u202ema\na.png,0.1\n", encoding="utf-8")
    with pytest.raises(ScoresError, match=r"label column 'Ede\\u202ema' .* U\+202E"):
        read_scores(p)
    p.write_text("image,Edema\na.png,\x1b]0;pwned\x07\n", encoding="utf-8")
    with pytest.raises(ScoresError) as err:
        read_scores(p)
    assert "\x1b" not in str(err.value) and "\x07" not in str(err.value)
    assert "'\\x1b]0;pwned\\x07' is not a probability" in str(err.value)


def test_scores_file_that_is_a_fifo_or_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "s.csv"
    os.mkfifo(fifo)
    with pytest.raises(ScoresError, match="is a named pipe"):
        read_scores(fifo)
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    with pytest.raises(ScoresError, match="is a character device"):
        read_scores(tmp_path / "zero.csv")


def test_memory_error_reading_scores_is_a_scores_error(tmp_path, monkeypatch):
    p = _scores(tmp_path / "s.csv", feats=False)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(pd, "read_csv", no_memory)
    with pytest.raises(ScoresError, match="too large to read in the memory available -- score fewer"):
        read_scores(p)


# --------------------------------------------------------------------------
# Checkpoints (sections 3 and 5)


def _payload(weights):
    return torch.load(weights, map_location="cpu", weights_only=True)


def _save(payload, path):
    torch.save(payload, path)
    return path


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, tiny_weights):
    payload = _payload(tiny_weights)
    payload["state_dict"]["classifier.bias"][1] = float("nan")
    nan = _save(payload, tmp_path / "nan.pt")
    with pytest.raises(ModelError) as err:
        load_checkpoint(nan)
    assert str(err.value).startswith(f"Checkpoint {nan}: tensor 'classifier.bias' holds a non-finite value "
                                     "(nan at flat index 1)")
    assert "retrain, or use another checkpoint" in str(err.value)
    payload = _payload(tiny_weights)
    payload["state_dict"]["features.denseblock2.denselayer3.conv1.weight"].view(-1)[7] = float("-inf")
    with pytest.raises(ModelError, match=r"'features.denseblock2.denselayer3.conv1.weight' holds a "
                                         r"non-finite value \(-inf at flat index 7\)"):
        load_checkpoint(_save(payload, tmp_path / "inf.pt"))
    # Through the CLI: Error:, exit 1, nothing written (the issue saw empty probabilities, "Failed none").
    manifest = make_study(tmp_path / "study", n_patients=1, images_per_patient=2, shape=(40, 40))
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(main, ["score", str(manifest), "--weights", str(nan), "--out", str(out),
                                  "--no-cache", "--workers", "0", "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith("Error: Checkpoint ") and "classifier.bias" in r.output
    assert not out.exists()


def test_network_outputs_that_are_not_finite_make_exclusions_with_a_reason(tmp_path, tiny_weights):
    # Finite weights that overflow float32 on every image: the last BatchNorm's
    # scale and shift at 3e38 make the pooled features infinite, the logits NaN.
    payload = _payload(tiny_weights)
    payload["state_dict"]["features.norm5.weight"].fill_(3e38)
    payload["state_dict"]["features.norm5.bias"].fill_(3e38)
    loaded = load_checkpoint(_save(payload, tmp_path / "overflow.pt"))
    rng = np.random.default_rng(0)
    images = [write_png(tmp_path / f"i{k}.png", rng, (40, 40)) for k in range(3)]
    res = score_images(images, loaded, num_workers=0)
    assert res.scores.empty and res.scored == 0
    assert sorted(res.failed) == sorted(map(str, images))
    assert all(v.startswith("network output not finite (NaN or infinity)") for v in res.failed.values())
    manifest = make_study(tmp_path / "study", n_patients=1, images_per_patient=2, shape=(40, 40))
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(main, ["score", str(manifest), "--weights", str(tmp_path / "overflow.pt"),
                                  "--out", str(out), "--no-cache", "--workers", "0", "--no-progress"])
    assert r.exit_code == 1 and "Error: none of the 2 image(s) could be scored" in r.output
    assert "network output not finite" in r.output and not out.exists()


def test_tensors_in_metadata_are_refused(tmp_path, tiny_weights):
    payload = _payload(tiny_weights)
    payload["metadata"]["note"] = {"history": [1, torch.zeros(4)]}
    with pytest.raises(ModelError, match=r"holds a tensor in metadata\['note'\]\['history'\]\[1\]; metadata may "
                                         r"hold plain values only"):
        load_checkpoint(_save(payload, tmp_path / "meta.pt"))


def _redeflated(src, dst):
    """``src`` (a torch zip checkpoint) with every member deflated, as the issue's attacker did."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        for info in zin.infolist():
            with zin.open(info) as fin, zout.open(info.filename, "w", force_zip64=True) as fout:
                for block in iter(lambda: fin.read(16 << 20), b""):
                    fout.write(block)
    return dst


def test_a_small_file_unpacking_to_a_huge_tensor_is_refused_before_loading(tmp_path, tiny_weights):
    payload = _payload(tiny_weights)
    # np.zeros' pages are the kernel's zero page until written: saving them costs no memory here.
    payload["metadata"]["blob"] = torch.from_numpy(np.zeros(400 << 20, np.uint8))
    plain = _save(payload, tmp_path / "plain.pt")
    del payload
    small = _redeflated(plain, tmp_path / "small.pt")
    plain.unlink()
    assert small.stat().st_size < 40 << 20
    out, peak = _peak_mb(tmp_path, """
        from covreport.errors import ModelError
        from covreport.model import load_checkpoint
    """, f"""
        try:
            load_checkpoint({str(small)!r})
            print("LOADED")
        except ModelError as exc:
            print("REFUSED", exc)
    """)
    assert out.startswith(f"REFUSED Checkpoint {small} holds ") and "MB of tensors when unpacked" in out, out
    print(f"peak growth {peak:.0f} MB")
    assert peak < MEMORY_LIMIT_MB, f"{peak:.0f} MB"


def test_checkpoint_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="is a named pipe"):
        load_checkpoint(fifo)


def test_memory_error_while_loading_a_checkpoint_is_said_as_such(tmp_path, tiny_weights, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(ModelError) as err:
        load_checkpoint(tiny_weights)
    assert "too large to load in the memory available" in str(err.value)
    assert "cannot be loaded safely" not in str(err.value)


# --------------------------------------------------------------------------
# Images (section 5)


def test_large_sparse_png_is_refused_by_size_and_magic_bytes_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as fh:
        fh.truncate(1536 << 20)  # 1.5 GB of zeros, taking no disk
    zeros = tmp_path / "zeros.png"
    with open(zeros, "wb") as fh:
        fh.truncate(400 << 20)  # under the 512 MiB image limit: refused by its first bytes
    out, peak = _peak_mb(tmp_path, """
        from covreport.errors import ImageError
        from covreport.images import load_image, probe_image
        from covreport.scoring import _hash
    """, f"""
        for path in ({str(huge)!r}, {str(zeros)!r}):
            print(_hash(path).reason)
            try:
                load_image(path)
            except ImageError as exc:
                print(exc.reason)
            print(probe_image(path))
    """)
    assert out.splitlines() == ["file too large (over 512 MiB, the largest image covreport reads)"] * 3 + [
        "not a recognised image format (PNG, JPEG or DICOM expected)"] * 2 + [
        "unreadable image (not PNG, JPEG or DICOM)"], out
    print(f"peak growth {peak:.0f} MB")
    assert peak < MEMORY_LIMIT_MB, f"{peak:.0f} MB"


def test_images_that_are_not_regular_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    for path in (fifo, tmp_path / "zero.png"):
        with pytest.raises(ImageError) as err:
            load_image(path)
        assert err.value.reason == "not a regular file (a named pipe, device or socket)"
        assert probe_image(path) == "not a regular file (a named pipe, device or socket)"


def _file_meta(transfer_syntax):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _pixel_header(rows, cols, samples, photometric):
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import SecondaryCaptureImageStorage

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _preamble_and_meta(transfer_syntax):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    buf = DicomBytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, _file_meta(transfer_syntax))
    return buf.getvalue()


def deflated_bomb(path, element_bytes):
    """A Deflated-transfer-syntax DICOM of a 64 x 64 image whose pixel element holds ``element_bytes``."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    comp = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        fh.write(_preamble_and_meta(DeflatedExplicitVRLittleEndian))
        fh.write(comp.compress(_pixel_header(64, 64, 1, "MONOCHROME2")))
        fh.write(comp.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, element_bytes)))
        block = bytes(16 << 20)
        for start in range(0, element_bytes, len(block)):
            fh.write(comp.compress(block[: min(len(block), element_bytes - start)]))
        fh.write(comp.flush())
    return path


def rle_rgb(path, rows, cols):
    """An RLE Lossless DICOM of ``rows x cols`` 8-bit RGB zeros: three PackBits segments of 128-byte runs."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    n = rows * cols
    segment = b"\x81\x00" * (n // 128) + (bytes([n % 128 - 1, 0]) if n % 128 else b"")
    segment += b"\x00" * (len(segment) % 2)
    offsets = [64, 64 + len(segment), 64 + 2 * len(segment)]
    header = struct.pack("<16I", 3, *offsets, *([0] * 12))
    pixels = encapsulate([header + segment * 3]) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)  # + sequence end
    with open(path, "wb") as fh:
        fh.write(_preamble_and_meta(RLELossless))
        fh.write(_pixel_header(rows, cols, 3, "RGB"))
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + pixels)
    return path


def test_deflated_dicom_is_inflated_under_a_byte_cap(tmp_path):
    bomb = deflated_bomb(tmp_path / "deflated.dcm", 600 << 20)
    assert bomb.stat().st_size < 4 << 20
    out, peak = _peak_mb(tmp_path, """
        from covreport.errors import ImageError
        from covreport.images import load_image, probe_image
        import pydicom.pixels
    """, f"""
        print(probe_image({str(bomb)!r}))
        try:
            load_image({str(bomb)!r})
        except ImageError as exc:
            print(exc.reason)
    """)
    lines = out.splitlines()
    assert lines[0].startswith("image too large (possible decompression bomb; the Deflated DICOM dataset "
                               "inflates to over "), out
    assert lines[1] == lines[0], out
    print(f"peak growth {peak:.0f} MB")
    assert peak < MEMORY_LIMIT_MB, f"{peak:.0f} MB"
    # A legitimate Deflated file still decodes, to the pixels of its uncompressed twin.
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from reliability_helpers import write_dicom

    deflated = write_dicom(tmp_path / "d.dcm", transfer_syntax=DeflatedExplicitVRLittleEndian)
    plain = write_dicom(tmp_path / "p.dcm")
    assert deflated.stat().st_size < plain.stat().st_size / 2  # really deflated
    assert probe_image(deflated) is None
    np.testing.assert_array_equal(load_image(deflated), load_image(plain))


def test_dicom_pixel_limit_counts_samples_and_bytes(tmp_path):
    rle = rle_rgb(tmp_path / "rgb.dcm", 6000, 6000)  # 36 M pixels (under 40 M), 108 MB as RGB
    assert rle.stat().st_size < 2 << 20
    out, peak = _peak_mb(tmp_path, """
        from covreport.errors import ImageError
        from covreport.images import load_image, probe_image
        import pydicom.pixels
    """, f"""
        print(probe_image({str(rle)!r}))
        try:
            load_image({str(rle)!r})
        except ImageError as exc:
            print(exc.reason)
    """)
    lines = out.splitlines()
    assert lines[0] == "image too large (possible decompression bomb)", out
    assert lines[1].startswith("image too large (possible decompression bomb; decoded pixel data over "
                               "80,000,000 bytes: rows x columns x samples x bytes per sample"), out
    print(f"peak growth {peak:.0f} MB")
    assert peak < MEMORY_LIMIT_MB, f"{peak:.0f} MB"
    # A small RLE RGB file still decodes (all zeros, as encoded).
    small = rle_rgb(tmp_path / "small.dcm", 64, 48)
    assert probe_image(small) is None
    arr = load_image(small)
    assert arr.shape == (64, 48) and float(arr.max()) == 0.0


def test_memory_error_decoding_an_image_is_an_image_error(tmp_path, monkeypatch):
    from covreport import images
    from reliability_helpers import write_dicom

    path = write_dicom(tmp_path / "ok.dcm")

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(images, "_read_dicom", no_memory)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.reason == "image too large to decode in memory"
    monkeypatch.setattr(images, "_decode_pil_strict", no_memory)
    with pytest.raises(ImageError, match="image too large to decode in memory"):
        load_image(write_png(tmp_path / "a.png", np.random.default_rng(0)))
