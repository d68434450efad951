"""Helpers of the reliability campaign (imported by its tests and conftest).

Kept out of ``conftest.py`` so that tests can import them by a unique module
name (``tests/conftest.py`` exists too).
"""

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NETGUARD_DIR = HERE / "netguard"
LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion")
TINY_SIZE = 32

if "covreport_netguard" in sys.modules:
    netguard = sys.modules["covreport_netguard"]
else:
    _spec = importlib.util.spec_from_file_location("covreport_netguard", NETGUARD_DIR / "sitecustomize.py")
    netguard = importlib.util.module_from_spec(_spec)
    sys.modules["covreport_netguard"] = netguard
    _spec.loader.exec_module(netguard)


def subprocess_env(tmp_path, **extra):
    """Environment for a ``covreport`` subprocess: network guard on, caches in tmp, 1-2 threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD_DIR), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COVREPORT_NETGUARD"] = "1"
    env["COVREPORT_CACHE_DIR"] = str(Path(tmp_path) / "_user_cache")
    env["COVREPORT_MODEL_DIR"] = str(Path(tmp_path) / "_user_model")
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def covreport_cmd(*args):
    """argv running the covreport CLI with this interpreter."""
    return [sys.executable, "-m", "covreport", *map(str, args)]


# --------------------------------------------------------------------------
# Small synthetic studies


def write_png(path, rng, shape=(48, 40)):
    """A random 8-bit greyscale PNG (distinct content per call)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def make_study(folder, n_patients=6, images_per_patient=3, seed=0, shape=(48, 40), notes=None,
               image_writer=None, image_name=None, patient_id=None, pair_id=None):
    """Images and a manifest: consecutive images of a patient make pairs.

    Outcomes cycle Worse, Improved, Stable over the pairs so each contrast
    has pairs. ``notes`` (a function of the pair number) fills the notes
    column. ``image_writer(path, rng)`` writes one image (default PNG),
    ``image_name(patient, i)`` names it (default ``images/P000_0.png``),
    ``patient_id(p)`` and ``pair_id(k)`` name patients and pairs. Returns
    the manifest path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = image_writer or (lambda p, r: write_png(p, r, shape))
    outcomes = ("Worse", "Improved", "Stable")
    rows = ["pair_id,patient_id,first_image,second_image,outcome,first_date,second_date,age,sex,notes"]
    k = 0
    name_of = image_name or (lambda p, i: f"images/P{p:03d}_{i}.png")
    patient_of = patient_id or (lambda p: f"P{p:03d}")
    pair_of = pair_id or (lambda k: f"pair{k:04d}")

    def cell(text):
        return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text

    for p in range(n_patients):
        names = [name_of(p, i) for i in range(images_per_patient)]
        for name in names:
            writer(folder / name, rng)
        for i in range(images_per_patient - 1):
            note = notes(k) if notes else ""
            rows.append(",".join([
                cell(pair_of(k)), cell(patient_of(p)), cell(names[i]), cell(names[i + 1]), outcomes[k % 3],
                f"2020-03-{1 + 2 * i:02d}", f"2020-03-{2 + 2 * i:02d}", str(30 + p), "MF"[p % 2], cell(note)]))
            k += 1
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


def random_scores(images, path, labels=LABELS, seed=0):
    """A scores CSV for ``images``: random probabilities, non-negative features."""
    import pandas as pd

    from covreport.constants import feature_columns

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"image": list(images)})
    for lab in labels:
        df[lab] = rng.random(len(df))
    feats = pd.DataFrame(rng.gamma(1.0, 1.0, (len(df), 1024)).astype(np.float32), columns=feature_columns())
    pd.concat([df, feats], axis=1).to_csv(path, index=False)
    return Path(path)


def manifest_images(manifest):
    """Distinct image cells of a manifest, in order of appearance."""
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    return list(dict.fromkeys(v for a, b in zip(df["first_image"], df["second_image"]) for v in (a, b)))


def results_without_created(path):
    """results.json as a dict, with provenance.created removed (the one field that may change)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["provenance"].pop("created", None)
    return data


def all_output_bytes(folder):
    """(relative path, bytes) of every file under ``folder``."""
    folder = Path(folder)
    return [(str(p.relative_to(folder)), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


# --------------------------------------------------------------------------
# Awkward image files


def _png_chunk(tag, data):
    import struct
    import zlib

    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width, height):
    """A small PNG whose header claims ``width x height`` 1-bit pixels (a decompression bomb).

    Only 64 rows of data are present: a decoder that trusted the header would
    allocate ``width * height`` bytes before finding out.
    """
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(64)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def gradient(shape=(40, 50), step=3):
    """A deterministic 8-bit gradient image (not symmetric, so rotations show)."""
    return (np.add.outer(np.arange(shape[0]) * 2, np.arange(shape[1])) * step % 256).astype(np.uint8)


def write_dicom(path, *, pixels=True, transfer_syntax=None, marker=None, junk_pixels=False,
                photometric="MONOCHROME2", array=None, rows=None, columns=None):
    """A DICOM file (Secondary Capture, DX) written with pydicom.

    ``marker`` fills patient and institution identifiers with a unique text
    (to prove none reaches an output). ``junk_pixels`` stores an
    encapsulated fragment of random bytes (with ``transfer_syntax`` e.g.
    JPEG 2000). ``rows``/``columns`` override the size the header claims.
    """
    import os as _os

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if marker:
        ds.PatientName = f"{marker}^NAME"
        ds.PatientID = f"{marker}ID"
        ds.PatientBirthDate = "19010203"
        ds.OtherPatientIDs = f"{marker}OTHER"
        ds.PatientAddress = f"{marker} street"
        ds.InstitutionName = f"{marker}INST"
        ds.AccessionNumber = marker[:16]
        ds.ReferringPhysicianName = f"{marker}^DR"
        ds.StudyDescription = f"{marker} study"
        ds.StudyID = marker[:16]
    if pixels:
        a = array if array is not None else (gradient().astype(np.uint16) * 16)
        ds.Rows = rows or a.shape[0]
        ds.Columns = columns or a.shape[1]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if junk_pixels:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + _os.urandom(256)])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = a.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------
# Fault injection


@contextlib.contextmanager
def tiny_tmpfs(folder, size="64k", read_only=False):
    """Mount a tiny tmpfs at ``folder`` for the duration; yield whether it could be mounted.

    Needs root and the right to mount (true in the development container,
    often not in CI): callers fall back to simulating the error when this
    yields False.
    """
    import subprocess

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = False
    allowed = os.environ.get("COVREPORT_TEST_NO_MOUNT") != "1"  # set it to test the simulated paths
    if allowed and hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                  capture_output=True, timeout=20)
            mounted = proc.returncode == 0
        except (OSError, subprocess.SubprocessError):
            mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=20)


def cache_rows(path):
    """Rows in a score cache database (0 if it does not exist yet), read without locking it."""
    import sqlite3

    if not Path(path).exists():
        return 0
    try:
        con = sqlite3.connect(str(path), timeout=0.2)
        try:
            return int(con.execute("SELECT COUNT(*) FROM scores").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def strip_lines(text, keys):
    """results.json text without the lines of the given keys (e.g. ``created``)."""
    import re

    pattern = re.compile(r'^\s*"(%s)": .*\n' % "|".join(map(re.escape, keys)), re.M)
    return pattern.sub("", text)
