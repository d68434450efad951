"""Synthetic chest-radiograph phantom study with a known answer.

:func:`make_study` writes, for a seed, always the same bytes:

* a CheXpert-layout training and validation set (``train.csv``, ``valid.csv``
  and ``train/patientNNNNN/studyN/viewN_frontal.png`` ...), with CheXpert's
  exact CSV columns, uncertain (-1) and blank labels in the training CSV at
  rates modelled on the real CheXpert training CSV, and 0/1 labels in the
  validation CSV;
* a COVID-like pair manifest (covreport's manifest format): patients with 2 to
  4 sequential AP radiographs whose severity follows a rise-then-fall course;
  each pair's outcome (Worse, Stable, Improved) follows from the change of
  severity, with the imbalance of the original cohort (44/8/8 of 60 pairs);
* ``truth.csv``: every image's ground truth (finding amounts and labels).

Images are drawn analytically (numpy, vectorised over a batch of images) with
soft edges, so that any ``image_size`` renders cleanly: thorax outline, lungs,
heart, mediastinum, trachea, spine, ribs, clavicles, diaphragm with a gastric
bubble, breast shadows, AP (magnified heart, scapulae) or PA projection,
exposure and positioning variation, and noise; laterals are a simpler side
view. Each finding has its own generator whose strength grows with an
*amount* in [0, 1] (0 = absent), see :data:`FINDINGS`.

The data are synthetic: they carry no information about real patients, and
a model trained on them says nothing about real radiographs.

References
----------
Irvin J, Rajpurkar P, Ko M, et al. CheXpert: a large chest radiograph dataset
with uncertainty labels and expert comparison. AAAI 2019;33:590-597
(layout, columns, label conventions).
Duchesne S, Gourdeau D, et al. Tracking and predicting COVID-19 radiological
trajectory using deep learning on chest X-rays: initial accuracy testing.
medRxiv 2020, doi:10.1101/2020.05.01.20086207 (cohort: 60 pairs of 40
patients, 44 Worse, 8 Stable, 8 Improved).
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from covreport._io import swap_dir
from covreport.constants import CHEXPERT_LABELS, IMPROVED, STABLE, WORSE
from covreport.errors import CovreportError

#: Name of the CheXpert-like folder inside a study.
CHEXPERT_DIRNAME = "CheXpert-phantom"
#: Name of the pair folder inside a study.
PAIRS_DIRNAME = "covid-pairs"

#: CheXpert's CSV columns, in order.
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_LABELS

#: Finding generators (amount in [0, 1]; 0 = absent), in CheXpert's order.
#: "No Finding" is derived (no other label positive).
FINDINGS = CHEXPERT_LABELS[1:]

#: Manifest columns written by the generator (covreport's manifest format).
MANIFEST_COLUMNS = (
    "patient_id", "pair_id", "first_image", "second_image", "outcome",
    "first_date", "second_date", "age", "sex", "first_view", "second_view",
    "source", "notes",
) + ("crp", "temperature", "icu_14d")

#: The phantom's clinical columns (issue 22), each pair at its first CXR, drawn after everything else so that
#: the images and outcomes are those of a phantom without them. ``crp`` (mg/L) carries the outcome: log-normal
#: with median 80 for a Worse pair, 40 for a Stable and 20 for an Improved one (SD 0.6 on the log scale);
#: ``temperature`` (degrees C) carries nothing, N(37.6, 0.7); ``icu_14d`` (yes/no), a clinical target, follows
#: the first CXR's severity s: P(yes) = expit(-3 + 5 s).
CLINICAL = {"crp_median": {WORSE: 80.0, STABLE: 40.0, IMPROVED: 20.0}, "crp_log_sd": 0.6,
            "temperature": (37.6, 0.7), "icu_logit": (-3.0, 5.0)}

#: Outcome proportions of the original cohort (44 Worse, 8 Stable, 8 Improved of 60).
COHORT_OUTCOMES = {WORSE: 44, STABLE: 8, IMPROVED: 8}

#: Study size of ``covreport demo`` (the defaults of :func:`make_study`).
DEMO_STUDY = {"image_size": 64, "n_train": 2400, "n_valid": 300, "n_patients": 40}

#: Training recipe that learns the demo study in about 150 Adam steps:
#: DenseNet121 from random weights, U-zeros, class-weighted BCE. Measured by
#: benchmarks/bench_phantom_learnability.py (8 to 9 of the 10 labels with
#: validation AUC >= 0.85 over three seeds; Worse vs Improved change of
#: Consolidation and Lung Opacity p < 1e-6; about 0.56 s per step on 2 idle
#: CPU threads, i.e. about 85 s of training).
DEMO_TRAINING = {"image_size": 64, "epochs": 2, "batch_size": 32, "lr": 1e-3, "init": "none"}

#: Change of severity below which a pair is Stable.
STABLE_THRESHOLD = 0.10

# Prevalence of each finding in the training / validation studies (higher than
# CheXpert's for the rare ones so that a small set has enough positives).
_PREVALENCE = {
    "Enlarged Cardiomediastinum": 0.20, "Cardiomegaly": 0.22, "Lung Lesion": 0.15,
    "Edema": 0.20, "Atelectasis": 0.20, "Pleural Effusion": 0.25,
    "Pleural Other": 0.14, "Pneumothorax": 0.05, "Fracture": 0.04,
    "Support Devices": 0.35,
}
# Airspace disease: a COVID-like infection (all three graded by one severity)
# or a single finding alone.
_P_INFECTION = 0.35
_P_ALONE = {"Lung Opacity": 0.14, "Consolidation": 0.08, "Pneumonia": 0.08}

# Fraction of negatives explicitly labelled 0 (the rest blank), from the real
# CheXpert training CSV (torchxrayvision's chexpert_train.csv.gz): neg/(neg+blank).
_EXPLICIT_NEGATIVE = {
    "Enlarged Cardiomediastinum": 0.108, "Cardiomegaly": 0.060, "Lung Opacity": 0.060,
    "Lung Lesion": 0.006, "Edema": 0.131, "Consolidation": 0.156, "Pneumonia": 0.015,
    "Atelectasis": 0.009, "Pneumothorax": 0.280, "Pleural Effusion": 0.281,
    "Pleural Other": 0.001, "Fracture": 0.012, "Support Devices": 0.057,
}
# Fraction of rows labelled uncertain (-1): the real CheXpert rate, kept within
# [0.02, 0.10]; half go to mild positives, half to negatives ("possible ...").
_UNCERTAIN = {
    "Enlarged Cardiomediastinum": 0.056, "Cardiomegaly": 0.036, "Lung Opacity": 0.025,
    "Lung Lesion": 0.020, "Edema": 0.058, "Consolidation": 0.10, "Pneumonia": 0.084,
    "Atelectasis": 0.10, "Pneumothorax": 0.020, "Pleural Effusion": 0.052,
    "Pleural Other": 0.020, "Fracture": 0.020, "Support Devices": 0.020,
}


@dataclass(frozen=True)
class PhantomStudy:
    """Paths and counts of a generated phantom study.

    Attributes
    ----------
    root : Path
        The study folder (``out_dir``).
    chexpert_root : Path
        CheXpert-layout folder: ``train.csv``, ``valid.csv``, ``train/``,
        ``valid/``. The CSV ``Path`` column is relative to its parent (``root``).
    train_csv, valid_csv : Path
        The training CSV (1, 0, -1, blank) and validation CSV (0/1 only).
    manifest : Path
        The COVID-like pair manifest; image paths relative to its folder.
    reference_csv : Path
        The CSV for Table 1's reference row (= ``train_csv``).
    truth_csv : Path
        Ground truth of every image: split, path, view, severity, amounts, labels.
    counts : dict
        ``train_images``, ``train_patients``, ``valid_images``,
        ``valid_patients``, ``pair_patients``, ``pair_images``, ``pairs`` and
        the pairs per outcome.
    seed, image_size : int
        Generator settings.
    """

    root: Path
    chexpert_root: Path
    train_csv: Path
    valid_csv: Path
    manifest: Path
    reference_csv: Path
    truth_csv: Path
    counts: dict = field(default_factory=dict)
    seed: int = 0
    image_size: int = 64


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


@contextmanager
def _staged(out_dir, overwrite):
    """A temporary sibling folder of ``out_dir`` to write a phantom into, moved into place whole when the
    block ends (removed if it raises); an existing non-empty ``out_dir`` is replaced only with ``overwrite``."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise CovreportError(
            f"phantom: output folder {out_dir} exists and is not empty; "
            "choose another folder or pass overwrite=True.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        swap_dir(tmp, out_dir, force=True, replace_any=True)  # overwrite was checked above
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_study(out_dir, *, seed=0, image_size=64, n_train=2400, n_valid=300,
               n_patients=40, lateral_fraction=0.10, pa_fraction=0.15,
               overwrite=False):
    """Write a synthetic phantom study (CheXpert-like sets and a pair manifest).

    Parameters
    ----------
    out_dir : path-like
        Folder to create. It is written in a temporary sibling folder and
        moved into place whole.
    seed : int
        Seed; the same seed gives the same bytes in every file.
    image_size : int
        Side of the square 8-bit grayscale PNG images (pixels, >= 32).
    n_train, n_valid : int
        Images of the training and validation sets (>= 20 each).
    n_patients : int
        Patients of the pair manifest (>= 3); each has 2 to 4 AP radiographs,
        so about 1.5 pairs per patient (40 patients give 60 pairs).
    lateral_fraction : float
        Fraction of training and validation images that are laterals (each
        beside the frontal of its study, same labels).
    pa_fraction : float
        Fraction of frontal training and validation images that are PA (the
        rest AP).
    overwrite : bool
        Replace an existing non-empty ``out_dir``.

    Returns
    -------
    PhantomStudy

    Raises
    ------
    CovreportError
        If ``out_dir`` exists and is not empty (without ``overwrite``), or a
        setting is out of range.
    """
    out_dir = Path(out_dir)
    _check_int("image_size", image_size, 32)
    _check_int("n_train", n_train, 20)
    _check_int("n_valid", n_valid, 20)
    _check_int("n_patients", n_patients, 3)
    for name, val in (("lateral_fraction", lateral_fraction), ("pa_fraction", pa_fraction)):
        if not 0 <= float(val) <= 0.5:
            raise CovreportError(f"phantom: {name}={val!r} is out of range; use a value in [0, 0.5].")
    ss_train, ss_valid, ss_pairs = np.random.SeedSequence(seed).spawn(3)
    with _staged(out_dir, overwrite) as tmp:
        chex = tmp / CHEXPERT_DIRNAME
        truth_rows = []
        tr = _write_chexpert_split(chex, "train", np.random.default_rng(ss_train), n_train,
                                   image_size, lateral_fraction, pa_fraction,
                                   first_patient=1, uncertain=True, truth_rows=truth_rows)
        va = _write_chexpert_split(chex, "valid", np.random.default_rng(ss_valid), n_valid,
                                   image_size, lateral_fraction, pa_fraction,
                                   first_patient=64541, uncertain=False, truth_rows=truth_rows)
        pc = _write_pairs(tmp / PAIRS_DIRNAME, np.random.default_rng(ss_pairs), n_patients,
                          image_size, truth_rows)
        _write_csv(tmp / "truth.csv", _truth_columns(), truth_rows)
        counts = {**tr, **va, **pc}
        _write_text(tmp / "README.txt", _readme(seed, image_size, counts))
    chex = out_dir / CHEXPERT_DIRNAME
    return PhantomStudy(
        root=out_dir, chexpert_root=chex, train_csv=chex / "train.csv",
        valid_csv=chex / "valid.csv", manifest=out_dir / PAIRS_DIRNAME / "manifest.csv",
        reference_csv=chex / "train.csv", truth_csv=out_dir / "truth.csv",
        counts=counts, seed=int(seed), image_size=int(image_size))


def make_site_study(out_dir, *, seed=0, image_size=64, n_patients=120, overwrite=False):
    """Write a phantom pair study of three sites, one shifted (:data:`SITES`, :data:`SITE_OUTCOMES`).

    The next study the original one calls for: the pairs of ``n_patients``
    patients spread over Hospitals A, B and C (the manifest's ``source``
    column), with the clinical columns of :func:`make_study`'s manifest.
    Hospital C admits later in the course (:data:`SITES`), so the first CXR
    discriminates less there. The images are rendered like the pairs of
    :func:`make_study`, so a model trained on its CheXpert-layout set scores
    them. Writes ``out_dir/covid-pairs/manifest.csv`` with its images,
    ``truth.csv`` and ``README.txt``, in a temporary sibling folder moved into
    place whole (an existing non-empty ``out_dir`` only with ``overwrite``).

    Returns
    -------
    dict
        ``manifest`` (its path), ``truth_csv`` and the counts (pairs per
        outcome and per site).
    """
    out_dir = Path(out_dir)
    _check_int("image_size", image_size, 32)
    _check_int("n_patients", n_patients, 12)
    # streams of their own: the 4th and 5th children of the seed (make_study draws from the first three)
    ss_pairs, ss_sites = np.random.SeedSequence(seed).spawn(5)[3:]
    with _staged(out_dir, overwrite) as tmp:
        truth_rows = []
        counts = _write_pairs(tmp / PAIRS_DIRNAME, np.random.default_rng(ss_pairs), n_patients, image_size,
                              truth_rows, sites=SITES, site_rng=np.random.default_rng(ss_sites),
                              mix=SITE_OUTCOMES)
        _write_csv(tmp / "truth.csv", _truth_columns(), truth_rows)
        shift = "; ".join(f"{site['name']}: Worse pairs start at severity {site['start'][WORSE][0]}-"
                          f"{site['start'][WORSE][1]}" for site in SITES)
        _write_text(tmp / "README.txt", _readme(seed, image_size, counts) + f"sites: {shift}\n")
    return {"manifest": out_dir / PAIRS_DIRNAME / "manifest.csv", "truth_csv": out_dir / "truth.csv", **counts}


def render_images(amounts, *, view="AP", seed=0, image_size=64):
    """Render radiographs with given finding amounts (for tests and figures).

    Parameters
    ----------
    amounts : list of dict
        One dict per image, ``{finding: amount in [0, 1]}``; findings not named
        are absent. Keys are names in :data:`FINDINGS`.
    view : {"AP", "PA", "Lateral"}
    seed : int
        Seed of the anatomy and finding geometry. Images share nothing but the
        seed stream: image ``i`` of two calls with the same seed and length
        has the same anatomy.
    image_size : int

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(len(amounts), image_size, image_size)``.
    """
    rng = np.random.default_rng(seed)
    n = len(amounts)
    p = _sample_anatomy(rng, n)
    p.update(_sample_geometry(rng, n))
    amt = np.zeros((n, len(FINDINGS)), dtype=np.float32)
    for i, d in enumerate(amounts):
        for k, v in d.items():
            if k not in FINDINGS:
                raise CovreportError(f"phantom: unknown finding {k!r}; use one of {', '.join(FINDINGS)}.")
            amt[i, FINDINGS.index(k)] = float(v)
    p["amount"] = amt
    _apply_anatomy_findings(p)
    p["view"] = np.array([view] * n)
    p["noise_seed"] = rng.integers(0, 2**63 - 1, size=n)
    return _render(p, image_size)


# --------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------


def _check_int(name, val, lo):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
        raise CovreportError(f"phantom: {name}={val!r} is out of range; use an integer >= {lo}.")


def _u(rng, lo, hi, n):
    return rng.uniform(lo, hi, n).astype(np.float32)


def _sample_anatomy(rng, n):
    """Per-image anatomy and acquisition parameters (normal values)."""
    return {
        "sex_female": rng.random(n) < 0.41,
        "thorax_a": _u(rng, 0.80, 0.93, n),       # half-width of the chest
        "lung_a": _u(rng, 0.27, 0.32, n),         # half-width of a lung
        "lung_top": _u(rng, -0.86, -0.76, n),     # apex
        "dome_r": _u(rng, 0.50, 0.60, n),         # costophrenic angle, right
        "dome_l": _u(rng, 0.55, 0.65, n),         # and left
        "dome_h": _u(rng, 0.14, 0.22, n),         # height of the domes
        "ctr": _u(rng, 0.37, 0.47, n),            # cardiothoracic ratio (normal)
        "med_w": _u(rng, 0.085, 0.125, n),        # half-width of the upper mediastinum
        "tissue": _u(rng, 0.40, 0.50, n),         # soft-tissue density
        "air": _u(rng, 0.27, 0.33, n),            # lung lucency
        "rib_period": _u(rng, 0.15, 0.18, n),
        "rib_phase": _u(rng, 0.0, 1.0, n),
        "rib_amp": _u(rng, 0.035, 0.065, n),
        "shift_x": _u(rng, -0.05, 0.05, n),
        "shift_y": _u(rng, -0.05, 0.05, n),
        "scale": _u(rng, 0.93, 1.05, n),
        "rot": _u(rng, -0.05, 0.05, n),
        "gain": _u(rng, 0.85, 1.15, n),
        "offset": _u(rng, -0.06, 0.06, n),
        "gamma": _u(rng, 0.8, 1.25, n),
        "noise": _u(rng, 0.01, 0.03, n),
    }


_K_PATCH = 6   # ground-glass patches (Lung Opacity)
_K_CONS = 3    # dense patches (Consolidation)


def _sample_geometry(rng, n):
    """Where each finding would appear (used only where its amount > 0)."""
    side = lambda: rng.choice(np.array([-1.0, 1.0], dtype=np.float32), n)  # noqa: E731
    g = {
        # ground-glass patches: side, lateral position (fraction of lung
        # half-width), height, size
        "gg_side": rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (n, _K_PATCH)),
        "gg_lat": rng.uniform(0.15, 0.8, (n, _K_PATCH)).astype(np.float32),
        "gg_y": rng.uniform(-0.05, 0.45, (n, _K_PATCH)).astype(np.float32),
        "gg_s": rng.uniform(0.09, 0.15, (n, _K_PATCH)).astype(np.float32),
        "cons_side": rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (n, _K_CONS)),
        "cons_lat": rng.uniform(0.0, 0.7, (n, _K_CONS)).astype(np.float32),
        "cons_y": rng.uniform(0.15, 0.45, (n, _K_CONS)).astype(np.float32),
        "cons_r": rng.uniform(0.10, 0.16, (n, _K_CONS)).astype(np.float32),
        "pneu_side": side(),
        "pneu_fissure": _u(rng, -0.15, 0.1, n),
        "edema_asym": _u(rng, 0.85, 1.15, n),
        "atel_side": side(),
        "atel_y": _u(rng, 0.15, 0.38, n),
        "atel_slope": _u(rng, -0.25, 0.25, n),
        "eff_side": rng.choice(np.array([-1.0, 1.0, 0.0], dtype=np.float32), n, p=[0.35, 0.35, 0.3]),
        "les_side": side(),
        "les_lat": _u(rng, -0.5, 0.6, n),
        "les_y": _u(rng, -0.5, 0.15, n),
        "les_r": _u(rng, 0.075, 0.11, n),
        "po_side": rng.choice(np.array([-1.0, 1.0, 0.0], dtype=np.float32), n, p=[0.35, 0.35, 0.3]),
        "po_apical": rng.random(n) < 0.3,
        "ptx_side": side(),
        "frac_side": side(),
        "frac_y": _u(rng, -0.4, 0.2, n),
        "sd_kind": rng.integers(0, 3, n),
    }
    return g


def _apply_anatomy_findings(p):
    """Anatomy changed by a finding: heart width and mediastinal width."""
    a = p["amount"]
    cm = a[:, FINDINGS.index("Cardiomegaly")]
    ecm = a[:, FINDINGS.index("Enlarged Cardiomediastinum")]
    p["ctr"] = np.where(cm > 0, 0.54 + 0.16 * cm, p["ctr"]).astype(np.float32)
    p["med_w"] = np.where(ecm > 0, 0.16 + 0.10 * ecm, p["med_w"]).astype(np.float32)


def _f(name):
    return FINDINGS.index(name)


def _covid_amounts(sev):
    """Amounts of the airspace findings for a COVID-like severity in [0, 1]."""
    sev = np.asarray(sev, dtype=np.float32)
    lo = np.where(sev >= 0.1, sev, 0.0)
    pn = np.clip((sev - 0.22) / 0.78, 0, 1)
    co = np.clip((sev - 0.38) / 0.62, 0, 1)
    return lo, pn, co


def _sample_findings(rng, n):
    """Amounts (n, len(FINDINGS)) and COVID-like severity of CheXpert-like studies."""
    amt = np.zeros((n, len(FINDINGS)), dtype=np.float32)
    for name, prev in _PREVALENCE.items():
        present = rng.random(n) < prev
        amt[:, _f(name)] = np.where(present, rng.uniform(0.1, 1.0, n), 0.0)
    sev = np.where(rng.random(n) < _P_INFECTION, rng.uniform(0.05, 1.0, n), 0.0).astype(np.float32)
    lo, pn, co = _covid_amounts(sev)
    for name, base in (("Lung Opacity", lo), ("Pneumonia", pn), ("Consolidation", co)):
        alone = np.where(rng.random(n) < _P_ALONE[name], rng.uniform(0.15, 1.0, n), 0.0)
        amt[:, _f(name)] = np.maximum(base, alone)
    # a consolidation or pneumonia is also an opacity
    amt[:, _f("Lung Opacity")] = np.maximum(
        amt[:, _f("Lung Opacity")],
        np.maximum(amt[:, _f("Consolidation")], amt[:, _f("Pneumonia")]) * 0.5)
    # small effusions accompany some edema
    ed = amt[:, _f("Edema")]
    pe = amt[:, _f("Pleural Effusion")]
    amt[:, _f("Pleural Effusion")] = np.where((ed > 0.5) & (rng.random(n) < 0.3),
                                              np.maximum(pe, 0.3 * ed), pe)
    return amt, sev


def _labels_from_amounts(amt):
    """Ground-truth labels (n, 14) in CheXpert's order: 1 where amount > 0."""
    pos = (amt > 0).astype(np.int8)
    nofind = (pos.sum(1) == 0).astype(np.int8)
    return np.column_stack([nofind, pos])


def _reported_labels(rng, truth, amt):
    """Training-CSV labels: 1, 0, -1 or blank (NaN), from the ground truth.

    Positives are reported 1 except mild ones, some of which are reported
    uncertain; negatives are mostly blank (not mentioned), some explicitly 0,
    a few uncertain. No Finding is 1 or blank, as in CheXpert.
    """
    n = truth.shape[0]
    rep = np.full(truth.shape, np.nan, dtype=np.float32)
    rep[:, 0] = np.where(truth[:, 0] == 1, 1.0, np.nan)
    for j, name in enumerate(FINDINGS, start=1):
        pos = truth[:, j] == 1
        col = np.where(pos, 1.0, np.nan)
        explicit = (~pos) & (rng.random(n) < _EXPLICIT_NEGATIVE[name])
        col[explicit] = 0.0
        n_unc = int(round(_UNCERTAIN[name] * n))
        mild = np.flatnonzero(pos & (amt[:, j - 1] < 0.35))
        neg = np.flatnonzero(~pos)
        k_mild = min(len(mild), n_unc // 2)
        k_neg = min(len(neg), n_unc - k_mild)
        col[rng.choice(mild, k_mild, replace=False)] = -1.0
        col[rng.choice(neg, k_neg, replace=False)] = -1.0
        rep[:, j] = col
    return rep


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------


def _soft(d, w):
    """Soft step: 0 for d << 0, 1 for d >> 0, width w."""
    return 0.5 * (1.0 + np.tanh(d / w))


def _lowfreq(rng, shape_b, size, cells):
    """Smooth random fields (b, size, size), about unit variance, ``cells`` bumps per side."""
    g = rng.standard_normal((shape_b, cells + 1, cells + 1)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i0 = np.minimum(np.floor(t).astype(int), cells - 1)
    f = t - i0
    f = f * f * (3 - 2 * f)
    a = g[:, i0, :] * (1 - f)[None, :, None] + g[:, i0 + 1, :] * f[None, :, None]
    return a[:, :, i0] * (1 - f)[None, None, :] + a[:, :, i0 + 1] * f[None, None, :]


def _seg_dist(x, y, x0, y0, x1, y1):
    """Distance from points (x, y) to segments (x0, y0)-(x1, y1) (broadcast)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return np.hypot(x - x0 - t * dx, y - y0 - t * dy)


def _col(v):
    return np.asarray(v, dtype=np.float32)[:, None, None]


def _render(p, size):
    """Render all images of parameter dict ``p`` as uint8 (n, size, size)."""
    n = len(p["view"])
    out = np.empty((n, size, size), dtype=np.uint8)
    chunk = max(1, int(2**20 // (size * size)))
    lateral = np.asarray(p["view"]) == "Lateral"
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        q = {k: v[sl] for k, v in p.items()}
        lat = lateral[sl]
        img = np.empty((sl.stop - sl.start, size, size), dtype=np.float32)
        if (~lat).any():
            img[~lat] = _frontal({k: v[~lat] for k, v in q.items()}, size)
        if lat.any():
            img[lat] = _lateral({k: v[lat] for k, v in q.items()}, size)
        out[sl] = _expose(q, img)
    return out


def _grid(p, size):
    """Patient coordinates (x right-to-left of the image, y down), per image."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    X = t[None, None, :]
    Y = t[None, :, None]
    c, s = np.cos(_col(p["rot"])), np.sin(_col(p["rot"]))
    X0, Y0 = X - _col(p["shift_x"]), Y - _col(p["shift_y"])
    sc = _col(p["scale"])
    x = (c * X0 + s * Y0) / sc
    y = (-s * X0 + c * Y0) / sc
    return x, y


def _expose(p, img):
    """Exposure (gain, offset, gamma) and quantum noise, to uint8."""
    b, size, _ = img.shape
    rngs = [np.random.default_rng(int(s)) for s in p["noise_seed"]]
    noise = np.stack([r.standard_normal((size, size)).astype(np.float32) for r in rngs])
    img = _col(p["gain"]) * img + _col(p["offset"])
    img = np.clip(img, 0, 1) ** _col(p["gamma"])
    img = img + _col(p["noise"]) * noise
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _hemithorax(p, x, y, sgn, w):
    """Geometry of one hemithorax (sgn -1: patient's right = image left)."""
    ta = _col(p["thorax_a"])
    top = _col(p["lung_top"])
    cp = _col(p["dome_r"] if sgn < 0 else p["dome_l"])
    at = _col(p["amount"][:, _f("Atelectasis")] * (p["atel_side"] == sgn))
    cp = cp - 0.06 * at  # volume loss raises the hemidiaphragm
    x_med = sgn * 0.07
    x_lat = sgn * (ta - 0.07)
    la = np.abs(x_lat - x_med) / 2
    cx0 = (x_lat + x_med) / 2
    # half-width grows from the apex down (rounded apex), widest at the base
    frac = np.clip((y - top) / 0.6, 0, 1)
    wy = la * np.sqrt(frac) * (0.92 + 0.08 * np.clip((y - top) / (cp - top), 0, 1))
    cx = cx0 - sgn * (la - wy) * 0.35
    lat_d = wy - sgn * (x - cx)          # distance inwards from the lateral wall
    med_d = wy + sgn * (x - cx)          # distance inwards from the medial border
    u = (x - cx0) / la                   # -1..1 across the hemithorax
    dome = cp - _col(p["dome_h"]) * np.clip(1 - ((x - cx0 + sgn * 0.12 * la) / (1.05 * la)) ** 2, 0, 1)
    inside = _soft(np.minimum(lat_d, med_d), 1.5 * w) * _soft(y - top, 1.5 * w)
    lung = inside * _soft(dome - y, 1.2 * w)
    return {"lung": lung, "inside": inside, "lat_d": lat_d, "med_d": med_d, "u": u,
            "cx": cx0, "la": la, "cp": cp, "dome": dome, "top": top}


def _frontal(p, size):
    x, y = _grid(p, size)
    a = p["amount"]
    w = 2.0 / size  # one pixel in patient units: edge softness
    ap = _col(np.asarray(p["view"]) != "PA")
    rng = np.random.default_rng(int(p["noise_seed"][0]) % (2**32))

    # body: superellipse with a narrower neck
    ta = _col(p["thorax_a"])
    body_a = ta + 0.08 - 0.6 * np.clip(-0.8 - y, 0, None)
    r_body = np.abs(x / np.maximum(body_a, 0.2)) ** 2.6 + np.abs((y - 0.15) / 1.3) ** 2.6
    body = _soft(1 - r_body, 4 * w)

    H = {sgn: _hemithorax(p, x, y, sgn, w) for sgn in (-1.0, 1.0)}
    lungs = H[-1.0]["lung"] + H[1.0]["lung"]

    # heart: a third right of the midline, two thirds left, on the left dome
    thor_w = 2 * (ta - 0.04)
    hw = _col(p["ctr"]) * thor_w / 2 * (1 + 0.06 * ap)      # half-width (AP magnifies)
    hx = hw / 3 + 0.01
    hy = _col(p["dome_l"]) - 0.2
    taper = 0.7 + 0.3 * np.clip((y - hy + 0.36) / 0.45, 0, 1)   # narrower at the top
    heart = _soft(1 - ((x - hx) / (hw * taper)) ** 2 - ((y - hy) / 0.38) ** 2, 2 * w)
    # upper mediastinum (vessels) with the aortic knob on the left
    mw = _col(p["med_w"]) * (1 + 0.05 * ap)
    knob = (0.04 + 0.3 * (mw - 0.1)) * np.exp(-((y + 0.38) / 0.09) ** 2) * (x > 0)
    med = _soft(mw + knob - np.abs(x - 0.01), 1.5 * w) * _soft(hy - y + 0.1, 4 * w)
    cardiomed = np.maximum(heart, med)
    lung_eff = np.clip(lungs, 0, 1) * (1 - 0.9 * cardiomed)

    img = _col(p["tissue"]) * body
    fem = _col(p["sex_female"])
    for sgn in (-1.0, 1.0):  # breast shadows
        bx = sgn * (ta - 0.28)
        img = img + 0.05 * fem * body * _soft(1 - ((x - bx) / 0.34) ** 2 - ((y - 0.5) / 0.24) ** 2, 8 * w)
    img = img - _col(p["air"]) * lung_eff
    # trachea, spine
    img = img - 0.09 * _soft(0.032 - np.abs(x - 0.01 - 0.02 * np.clip(y + 0.6, 0, None)), w) \
        * _soft(-0.28 - y, 2 * w) * body
    img = img + 0.06 * _soft(0.065 - np.abs(x), 2 * w) * body
    # gastric bubble under the left dome
    img = img - 0.10 * _soft(1 - ((x - 0.42) / 0.12) ** 2 - ((y - _col(p["dome_l"]) - 0.08) / 0.055) ** 2, 2 * w)

    # ribs over the hemithoraces: posterior ribs rise from the spine and curve
    # down laterally; fainter anterior ribs run down towards the midline
    thor = sum(H[sg]["inside"] * _soft(H[sg]["dome"] + 0.06 - y, 3 * w) for sg in (-1.0, 1.0))
    thor = np.clip(thor, 0, 1) * (1 - 0.6 * cardiomed)
    per, ph, amp = _col(p["rib_period"]), _col(p["rib_phase"]), _col(p["rib_amp"])
    ax = np.abs(x)
    v = y + 0.35 * ax - 0.75 * ax**2
    post = _soft(np.cos(2 * np.pi * (v / per - ph)) - 0.35, 0.3)
    va = y - 0.30 * ax
    ant = _soft(np.cos(2 * np.pi * (va / (per * 1.25) - ph)) - 0.55, 0.3)
    img = img + amp * (post + 0.45 * ant) * thor * _soft(ax - 0.06, w)
    for sgn in (-1.0, 1.0):  # clavicles, scapular edges on AP films
        dcl = _seg_dist(x, y, sgn * 0.07, -0.66 - 0.03 * ap, sgn * 0.66, -0.86 + 0.05 * ap)
        img = img + 0.10 * _soft(0.032 - dcl, w)
        dsc = _seg_dist(x, y, sgn * (ta - 0.04), -0.75, sgn * (ta - 0.2), -0.05)
        img = img + 0.05 * ap * _soft(0.04 - dsc, 3 * w) * body

    # ----- findings: one generator each, run only on the images that have it -----
    ctx = {"p": p, "x": x, "y": y, "w": np.float32(w), "ta": ta, "H": H,
           "noise1": _lowfreq(rng, x.shape[0], size, 7),
           "noise2": _lowfreq(rng, x.shape[0], size, 11),
           "lung_eff": lung_eff, "cardiomed": cardiomed}
    for name, gen in _FRONTAL_GENERATORS:
        idx = np.flatnonzero(a[:, _f(name)] > 0)
        if idx.size:
            img[idx] += gen(_subset(ctx, idx), _col(a[idx, _f(name)]))
    return img * np.clip(body + 0.25, 0, 1) + 0.03


def _subset(obj, idx):
    """The images ``idx`` of a context (dicts of per-image arrays, first axis = image)."""
    if isinstance(obj, dict):
        return {k: _subset(v, idx) for k, v in obj.items()}
    if isinstance(obj, np.ndarray) and obj.ndim >= 1 and obj.shape[0] > 1:
        return obj[idx]
    return obj


def _pick(c, sg, key):
    """Per image, the right (sg < 0) or left hemithorax's ``key``."""
    return np.where(sg < 0, c["H"][-1.0][key], c["H"][1.0][key])


def _gen_lung_opacity(c, lo):
    """Ground-glass, peripheral, lower-zone patches; number and density grow with the amount."""
    p, x, y = c["p"], c["x"], c["y"]
    op = np.zeros_like(x)
    for k in range(_K_PATCH):
        on = np.clip(1 + lo * _K_PATCH - k, 0, 1)
        sg = _col(p["gg_side"][:, k])
        cx = _pick(c, sg, "cx") + sg * _pick(c, sg, "la") * _col(p["gg_lat"][:, k])
        d2 = (x - cx) ** 2 + (y - _col(p["gg_y"][:, k])) ** 2
        op = op + on * np.exp(-d2 / (2 * _col(p["gg_s"][:, k]) ** 2))
    tex = 0.75 + 0.25 * c["noise1"]
    return np.clip(op, 0, 1.2) * (0.10 + 0.12 * lo) * tex * c["lung_eff"]


def _gen_consolidation(c, co):
    """Dense, homogeneous, lobulated lower-zone areas."""
    p, x, y, w = c["p"], c["x"], c["y"], c["w"]
    g = np.zeros_like(x)
    for k in range(_K_CONS):
        on = np.clip(co * (_K_CONS + 0.5) - k + 0.5, 0, 1)
        sg = _col(p["cons_side"][:, k])
        cx = _pick(c, sg, "cx") + sg * _pick(c, sg, "la") * _col(p["cons_lat"][:, k])
        r = _col(p["cons_r"][:, k]) * (0.75 + 0.5 * co)
        g = np.maximum(g, on * np.exp(-((x - cx) ** 2 / 1.4 + (y - _col(p["cons_y"][:, k])) ** 2) / (2 * r**2)))
    return _soft(g + 0.18 * c["noise2"] - 0.45, 2.5 * w) * (0.17 + 0.12 * co) * c["lung_eff"]


def _gen_pneumonia(c, pn):
    """Unilateral lobar (lower lobe, below an oblique fissure) mottled airspace disease."""
    p, y, w = c["p"], c["y"], c["w"]
    sg = _col(p["pneu_side"])
    fiss = _col(p["pneu_fissure"]) - 0.25 * _pick(c, sg, "u") * sg
    lobe = _pick(c, sg, "inside") * _soft(y - fiss, 3 * w)
    mott = _soft(c["noise2"] + 1.5 * pn - 0.4, 0.35)
    return lobe * mott * (0.09 + 0.14 * pn) * c["lung_eff"]


def _gen_edema(c, ed):
    """Bilateral perihilar haze (bat wing), fuzzy hila."""
    p, x, y = c["p"], c["x"], c["y"]
    edema = np.zeros_like(x)
    for sgn in (-1.0, 1.0):
        asym = _col(p["edema_asym"]) if sgn > 0 else 1.0
        edema = edema + asym * np.exp(-((x - sgn * 0.2) ** 2) / (2 * 0.15**2) - ((y + 0.02) ** 2) / (2 * 0.22**2))
    return edema * (0.10 + 0.18 * ed) * (0.85 + 0.15 * c["noise1"]) * c["lung_eff"]


def _gen_atelectasis(c, at):
    """A plate-like band across the lower zone (the hemidiaphragm is raised in _hemithorax)."""
    p, x, y, w = c["p"], c["x"], c["y"], c["w"]
    sg = _col(p["atel_side"])
    cxa, laa = _pick(c, sg, "cx"), _pick(c, sg, "la")
    y0, slope = _col(p["atel_y"]), _col(p["atel_slope"])
    da = _seg_dist(x, y, cxa - 0.85 * laa, y0 - slope * laa, cxa + 0.85 * laa, y0 + slope * laa)
    return _soft(0.026 + 0.024 * at - da, w) * (0.24 + 0.1 * at) * c["lung_eff"]


def _gen_lung_lesion(c, ll):
    """A round, well-defined nodule."""
    p, x, y, w = c["p"], c["x"], c["y"], c["w"]
    sg = _col(p["les_side"])
    cxl = _pick(c, sg, "cx") + sg * _pick(c, sg, "la") * _col(p["les_lat"])
    dl = np.hypot(x - cxl, y - _col(p["les_y"]))
    return _soft(_col(p["les_r"]) * (0.8 + 0.4 * ll) - dl, w) * (0.22 + 0.1 * ll) * c["lung_eff"]


def _gen_pleural_effusion(c, pe):
    """Basal fluid with a meniscus rising laterally; costophrenic angle and dome blunted."""
    p, y, w = c["p"], c["y"], c["w"]
    eside = _col(p["eff_side"])
    fluid = np.zeros_like(y * c["x"])
    for sgn in (-1.0, 1.0):
        h_ = c["H"][sgn]
        on = (eside == sgn) | (eside == 0)
        hgt = 0.22 + 0.42 * pe
        t = np.clip(sgn * h_["u"], -1, 1)
        yf = h_["cp"] - hgt * (0.45 + 0.55 * ((t + 1) / 2) ** 2)
        grad = np.clip((y - yf) / (hgt + 1e-3), 0, 1)
        fl = _soft(np.minimum(h_["lat_d"], h_["med_d"]) + 0.02, 1.5 * w) * _soft(y - yf, 2 * w)
        fluid = fluid + on * fl * (0.85 + 0.15 * grad) * np.clip(h_["lung"], 0, 1)
    return np.clip(fluid, 0, 1) * (_col(p["air"]) + 0.03) * (1 - 0.5 * c["cardiomed"])


def _gen_pleural_other(c, po):
    """Pleural thickening (lumpy plaques) along the lateral walls, or an apical cap."""
    p, y, w = c["p"], c["y"], c["w"]
    pside = _col(p["po_side"])
    apical = _col(p["po_apical"]) > 0
    thick = (0.08 + 0.07 * po) * np.clip(0.8 + 0.3 * c["noise1"], 0.4, None)
    plaque = np.zeros_like(y * c["x"])
    for sgn in (-1.0, 1.0):
        h_ = c["H"][sgn]
        on = (pside == sgn) | (pside == 0)
        band = _soft(h_["lat_d"] + 0.01, w) * _soft(thick - h_["lat_d"], w) * h_["inside"]
        lateral = band * _soft(0.4 - y, 3 * w) * _soft(y + 0.55, 3 * w)
        cap = np.maximum(_soft(1.6 * thick - (y - h_["top"]), w) * h_["inside"], band) * _soft(-0.35 - y, 2 * w)
        plaque = plaque + on * np.where(apical, cap, lateral)
    return np.clip(plaque, 0, 1) * (0.28 + 0.1 * po)


def _gen_pneumothorax(c, px):
    """Lateral-apical lucency without lung markings, visceral pleural line."""
    p, y, w = c["p"], c["y"], c["w"]
    sg = _col(p["ptx_side"])
    latd = _pick(c, sg, "lat_d")
    rim = 0.05 + 0.08 * px
    upper = _soft(0.1 - y, 4 * w) * _pick(c, sg, "inside")
    return upper * (-0.07 * _soft(rim - latd, w) * _soft(latd, w)
                    + 0.10 * _soft(0.012 - np.abs(latd - rim), 0.5 * w))


def _gen_fracture(c, _amount):
    """A healing rib fracture (callus) on a lateral rib."""
    p, x, y, w = c["p"], c["x"], c["y"], c["w"]
    sg = _col(p["frac_side"])
    dfr = np.hypot(x - sg * (c["ta"] - 0.12), y - _col(p["frac_y"]))
    return 0.18 * _soft(0.045 - dfr, w)


def _gen_support_devices(c, _amount):
    """Endotracheal tube, central venous line or ECG leads."""
    p, x, y, w = c["p"], c["x"], c["y"], c["w"]
    kind = _col(p["sd_kind"])
    ett = _soft(0.012 - np.abs(x - 0.01), 0.5 * w) * _soft(-0.38 - y, w)
    cvc = np.maximum(_soft(0.012 - _seg_dist(x, y, -0.6, -0.82, -0.07, -0.5), 0.5 * w),
                     _soft(0.012 - _seg_dist(x, y, -0.07, -0.5, -0.06, -0.05), 0.5 * w))
    ecg = sum(_soft(0.035 - np.hypot(x - ex, y - ey), w) for ex, ey in ((-0.5, -0.55), (0.5, -0.55), (0.4, 0.35)))
    dev = np.where(kind == 0, ett, np.where(kind == 1, cvc, ecg))
    return 0.3 * np.clip(dev, 0, 1)


#: The frontal finding generators (Cardiomegaly and Enlarged Cardiomediastinum
#: change the anatomy instead: heart and mediastinal width).
_FRONTAL_GENERATORS = (
    ("Lung Opacity", _gen_lung_opacity), ("Consolidation", _gen_consolidation),
    ("Pneumonia", _gen_pneumonia), ("Edema", _gen_edema), ("Atelectasis", _gen_atelectasis),
    ("Lung Lesion", _gen_lung_lesion), ("Pleural Effusion", _gen_pleural_effusion),
    ("Pleural Other", _gen_pleural_other), ("Pneumothorax", _gen_pneumothorax),
    ("Fracture", _gen_fracture), ("Support Devices", _gen_support_devices),
)


def _lateral(p, size):
    """A simpler side view: anterior on the image left, posterior on the right."""
    x, y = _grid(p, size)
    a = p["amount"]
    w = 2.0 / size
    rng = np.random.default_rng(int(p["noise_seed"][0]) % (2**32) + 1)
    A = lambda name: _col(a[:, _f(name)])  # noqa: E731
    body = _soft(1 - (x / 0.82) ** 2 - ((y - 0.1) / 1.2) ** 2, 4 * w)
    cp = (_col(p["dome_r"]) + _col(p["dome_l"])) / 2 + 0.05
    dome = cp - 0.15 - 0.12 * (1 - ((x - 0.05) / 0.65) ** 2)
    lung = _soft(1 - ((x - 0.05) / 0.62) ** 2 - ((y + 0.05) / 0.78) ** 2, 3 * w) * _soft(dome - y, 2 * w)
    # heart anterior-inferior
    hw = 0.20 + 0.5 * (_col(p["ctr"]) - 0.4)
    heart = _soft(1 - ((x + 0.28) / hw) ** 2 - ((y - 0.3) / 0.3) ** 2, 3 * w)
    # anterior mediastinum widening (retrosternal density)
    mw = _col(p["med_w"])
    med = np.clip((mw - 0.13) / 0.08, 0, 1) * _soft(1 - ((x + 0.42) / 0.22) ** 2 - ((y + 0.25) / 0.38) ** 2, 3 * w)
    cm = np.maximum(heart, med)
    lung_eff = lung * (1 - cm)
    img = _col(p["tissue"]) * body - _col(p["air"]) * lung_eff + 0.05 * cm * body
    # spine with vertebral bodies, sternum
    vert = _soft(np.cos(2 * np.pi * (y / 0.16 + _col(p["rib_phase"]))) + 0.3, 0.3)
    img = img + 0.12 * _soft(0.1 - np.abs(x - 0.62), 2 * w) * (0.6 + 0.4 * vert) * body
    img = img + 0.08 * _soft(0.025 - np.abs(x + 0.72 + 0.05 * y), w) * _soft(0.5 - np.abs(y + 0.2), w)
    # trachea
    img = img - 0.08 * _soft(0.04 - np.abs(x - 0.1 + 0.1 * y), w) * _soft(-0.25 - y, 2 * w) * body

    tex = 0.75 + 0.25 * _lowfreq(rng, x.shape[0], size, 7)
    lo, co, pn = A("Lung Opacity"), A("Consolidation"), A("Pneumonia")
    post_low = np.exp(-((x - 0.3) ** 2) / (2 * 0.25**2) - ((y - 0.3) ** 2) / (2 * 0.22**2))
    f = (0.10 + 0.14 * lo) * (lo > 0) * post_low * np.clip(lo * 2, 0, 1) * tex
    f = f + (0.22 + 0.18 * co) * (co > 0) * _soft(0.12 + 0.1 * co - np.hypot(x - 0.35, y - 0.35), 1.5 * w)
    f = f + (0.10 + 0.16 * pn) * (pn > 0) * _soft(y - 0.05, 3 * w) * _soft(x - 0.0, 3 * w) * tex
    ed = A("Edema")
    f = f + (0.08 + 0.2 * ed) * (ed > 0) * np.exp(-((x - 0.1) ** 2 + (y + 0.05) ** 2) / (2 * 0.22**2))
    at = A("Atelectasis")
    f = f + (0.22 + 0.12 * at) * (at > 0) * _soft(0.02 + 0.02 * at - _seg_dist(x, y, -0.3, 0.15, 0.4, 0.25), w)
    ll = A("Lung Lesion")
    f = f + (0.22 + 0.12 * ll) * (ll > 0) * _soft(_col(p["les_r"]) - np.hypot(x - 0.3 * _col(p["les_lat"]), y - _col(p["les_y"])), w)
    img = img + f * lung_eff
    pe = A("Pleural Effusion")
    yf = cp - 0.1 - 0.35 * pe - 0.15 * np.clip(x - 0.1, 0, None)
    fluid = _soft(y - yf, 2 * w) * _soft(1 - ((x - 0.05) / 0.64) ** 2 - ((y + 0.05) / 0.8) ** 2, 2 * w) * _soft(x + 0.1, 3 * w)
    img = img + (pe > 0) * fluid * lung * (_col(p["air"]) + 0.03)
    po = A("Pleural Other")
    rr = np.sqrt(np.clip(((x - 0.05) / 0.62) ** 2 + ((y + 0.05) / 0.78) ** 2, 0, None))
    img = img + (po > 0) * (0.25 + 0.1 * po) * _soft(rr - 0.9 + 0.05 * po, w) * _soft(1 - rr, w) * _soft(x - 0.2, 3 * w)
    sd = A("Support Devices")
    img = img + (sd > 0) * 0.25 * _soft(0.012 - np.abs(x - 0.1 + 0.1 * y), 0.5 * w) * _soft(-0.35 - y, w)
    return img * np.clip(body + 0.25, 0, 1) + 0.03


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _png_bytes(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _write_bytes(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _write_text(path, text):
    _write_bytes(path, text.encode("utf-8"))


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return ""
        if float(v).is_integer():
            return f"{float(v):.1f}"
        return f"{float(v):.4f}"
    return str(v)


def _write_csv(path, columns, rows):
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(columns)
    for row in rows:
        wr.writerow([_fmt(row.get(c)) for c in columns])
    _write_text(path, buf.getvalue())


def _truth_columns():
    return ["split", "image", "patient", "view", "severity"] + \
        [f"amount {f}" for f in FINDINGS] + list(CHEXPERT_LABELS)


def _ages(rng, n, mean, sd, lo=18, hi=90):
    return np.clip(np.rint(rng.normal(mean, sd, n)), lo, hi).astype(int)


def _write_chexpert_split(chex, split, rng, n_images, size, lateral_fraction, pa_fraction,
                          first_patient, uncertain, truth_rows):
    """Write one CheXpert split (images + CSV); return its counts."""
    n_lat = int(round(n_images * lateral_fraction))
    n_studies = n_images - n_lat
    # studies -> patients (1 to 3 studies each)
    per = rng.choice([1, 2, 3], size=n_studies, p=[0.6, 0.25, 0.15])
    patient_of = np.repeat(np.arange(n_studies), per)[:n_studies]
    n_pat = int(patient_of.max()) + 1
    study_no = np.zeros(n_studies, dtype=int)
    for i in range(1, n_studies):
        study_no[i] = study_no[i - 1] + 1 if patient_of[i] == patient_of[i - 1] else 0
    female = rng.random(n_pat) < 0.41
    age = _ages(rng, n_pat, 60.4, 17.8)
    amt, sev = _sample_findings(rng, n_studies)
    truth = _labels_from_amounts(amt)
    has_lat = np.zeros(n_studies, dtype=bool)
    has_lat[rng.choice(n_studies, n_lat, replace=False)] = True
    view = np.where(rng.random(n_studies) < pa_fraction, "PA", "AP")

    # one row per image: frontal, then the study's lateral
    idx = np.repeat(np.arange(n_studies), 1 + has_lat)
    is_lat = np.zeros(len(idx), dtype=bool)
    is_lat[1:] = idx[1:] == idx[:-1]
    anat = _sample_anatomy(rng, n_studies)
    anat["sex_female"] = female[patient_of]
    geom = _sample_geometry(rng, n_studies)
    p = {k: v[idx] for k, v in {**anat, **geom}.items()}
    p["amount"] = amt[idx]
    _apply_anatomy_findings(p)
    p["view"] = np.where(is_lat, "Lateral", view[idx])
    p["noise_seed"] = rng.integers(0, 2**63 - 1, size=len(idx))
    pixels = _render(p, size)

    reported = _reported_labels(rng, truth, amt) if uncertain else truth.astype(np.float32)
    rows = []
    for r, (s, lat) in enumerate(zip(idx, is_lat)):
        pat = first_patient + patient_of[s]
        vname = "view2_lateral.png" if lat else "view1_frontal.png"
        rel = f"{CHEXPERT_DIRNAME}/{split}/patient{pat:05d}/study{study_no[s] + 1}/{vname}"
        _write_bytes(chex.parent / rel, _png_bytes(pixels[r]))
        row = {"Path": rel, "Sex": "Female" if female[patient_of[s]] else "Male",
               "Age": int(age[patient_of[s]]), "Frontal/Lateral": "Lateral" if lat else "Frontal",
               "AP/PA": "" if lat else str(view[s])}
        for j, lab in enumerate(CHEXPERT_LABELS):
            row[lab] = float(reported[s, j])
        rows.append(row)
        tr = {"split": split, "image": rel, "patient": f"patient{pat:05d}",
              "view": "Lateral" if lat else str(view[s]), "severity": float(sev[s])}
        tr.update({f"amount {f}": float(amt[s, k]) for k, f in enumerate(FINDINGS)})
        tr.update({lab: int(truth[s, j]) for j, lab in enumerate(CHEXPERT_LABELS)})
        truth_rows.append(tr)
    _write_csv(chex / f"{split}.csv", CHEXPERT_COLUMNS, rows)
    return {f"{split}_images": len(idx), f"{split}_patients": n_pat}


def _images_per_patient(rng, n_patients):
    """2, 3 or 4 images per patient in the cohort's mix (25/10/5 of 40)."""
    n3 = int(round(n_patients * 10 / 40))
    n4 = int(round(n_patients * 5 / 40))
    k = np.array([2] * (n_patients - n3 - n4) + [3] * n3 + [4] * n4)
    return rng.permutation(k)


def _outcome_list(n_pairs, mix=COHORT_OUTCOMES):
    tot = sum(mix.values())
    n_s = max(1, int(round(n_pairs * mix[STABLE] / tot)))
    n_i = max(1, int(round(n_pairs * mix[IMPROVED] / tot)))
    return [WORSE] * (n_pairs - n_s - n_i) + [STABLE] * n_s + [IMPROVED] * n_i


#: The sites of :func:`make_site_study`: a share of its patients each, and the range of the first severity
#: of each outcome. Hospital C admits later in the course: its Worse pairs start at 0.3-0.8 (0-0.5 at A and
#: B), where its Improved ones start too (0.6-1.0 everywhere), so the first CXR tells its Worse from its
#: Improved pairs less well: the shifted site that the heterogeneity of the site meta-analysis must show.
SITES = (
    {"name": "Hospital A", "share": 0.40, "start": {WORSE: (0.0, 0.5), STABLE: (0.0, 1.0), IMPROVED: (0.6, 1.0)}},
    {"name": "Hospital B", "share": 0.35, "start": {WORSE: (0.0, 0.5), STABLE: (0.0, 1.0), IMPROVED: (0.6, 1.0)}},
    {"name": "Hospital C", "share": 0.25, "start": {WORSE: (0.3, 0.8), STABLE: (0.0, 1.0), IMPROVED: (0.6, 1.0)}},
)

#: Outcome proportions of :func:`make_site_study`: a larger, less unbalanced cohort than the original's,
#: so that every site has Worse and Improved pairs in number.
SITE_OUTCOMES = {WORSE: 50, STABLE: 20, IMPROVED: 30}


def outcome_from_change(change, threshold=STABLE_THRESHOLD):
    """Outcome of a pair from its change of severity (second minus first)."""
    if change > threshold:
        return WORSE
    if change < -threshold:
        return IMPROVED
    return STABLE


# Per outcome: the range of the pair's first severity and of its change.
_START = {WORSE: (0.0, 0.5), STABLE: (0.0, 1.0), IMPROVED: (0.6, 1.0)}
_DELTA = {WORSE: (0.15, 0.40), STABLE: (-0.05, 0.05), IMPROVED: (-0.45, -0.15)}


def _trajectory(rng, outcomes, start=_START):
    """Severities of a patient's images for its ordered pair outcomes.

    The course rises, plateaus, then falls (Worse pairs first, then Stable,
    then Improved). A Worse pair starts at a low to moderate severity
    (<= 0.5) and rises by 0.15 to 0.40; an Improved pair starts at a high one
    (>= 0.6) and falls by 0.15 to 0.45; a Stable pair changes by at most 0.05
    (the outcome threshold is :data:`STABLE_THRESHOLD`); ``start`` may give other
    ranges of the first severity (a site that admits later). The feasible range
    of each severity is found backwards, then values are drawn forwards
    uniformly within it, so every sequence of outcomes gets a trajectory.
    """
    n = len(outcomes)
    lo, hi = np.zeros(n + 1), np.ones(n + 1)
    for j in range(n - 1, -1, -1):
        (s_lo, s_hi), (d_lo, d_hi) = start[outcomes[j]], _DELTA[outcomes[j]]
        lo[j] = max(s_lo, lo[j + 1] - d_hi)
        hi[j] = min(s_hi, hi[j + 1] - d_lo)
        if lo[j] > hi[j]:  # pragma: no cover - the ranges above always allow a course
            raise RuntimeError(f"phantom: no trajectory for outcomes {list(outcomes)}")
    s = [rng.uniform(lo[0], hi[0])]
    for j, o in enumerate(outcomes):
        d_lo, d_hi = _DELTA[o]
        s.append(rng.uniform(max(lo[j + 1], s[-1] + d_lo), min(hi[j + 1], s[-1] + d_hi)))
    return np.array(s, dtype=np.float32)


def _clinical_columns(rng, rows, first_severity):
    """``crp``, ``temperature`` and ``icu_14d`` of each pair (:data:`CLINICAL`), drawn in row order."""
    median = np.array([CLINICAL["crp_median"][r["outcome"]] for r in rows])
    crp = median * np.exp(rng.normal(0.0, CLINICAL["crp_log_sd"], len(rows)))
    temp = rng.normal(*CLINICAL["temperature"], len(rows))
    a, b = CLINICAL["icu_logit"]
    icu = rng.random(len(rows)) < 1 / (1 + np.exp(-(a + b * first_severity)))
    for r, c, t, u in zip(rows, crp, temp, icu):
        r.update(crp=f"{c:.1f}", temperature=f"{t:.1f}", icu_14d="yes" if u else "no")


def _site_of_patients(rng, n_patients, sites):
    """Each patient's site index: ``round(share * n)`` patients per site (the last takes the rest), shuffled."""
    n = [int(round(site["share"] * n_patients)) for site in sites[:-1]]
    n.append(n_patients - sum(n))
    if min(n) < 1:
        raise CovreportError(f"phantom: {n_patients} patients leave a site without patients; use more patients.")
    return rng.permutation(np.repeat(np.arange(len(sites)), n))


def _write_pairs(folder, rng, n_patients, size, truth_rows, *, sites=None, site_rng=None, mix=COHORT_OUTCOMES):
    """Write the COVID-like pair images and manifest; return counts.

    ``sites`` (:data:`SITES`) spreads the patients over sites drawn from ``site_rng`` (the
    ``source`` column names each pair's site, and a site's ``start`` ranges give its first severities);
    without it every pair's source is ``phantom``. ``mix`` gives the outcome proportions of the pairs.
    """
    k = _images_per_patient(rng, n_patients)
    n_pairs = int((k - 1).sum())
    outcomes = list(rng.permutation(_outcome_list(n_pairs, mix)))
    order = {WORSE: 0, STABLE: 1, IMPROVED: 2}
    per_patient, pos = [], 0
    for kk in k:
        per_patient.append(sorted(outcomes[pos:pos + kk - 1], key=order.get))
        pos += kk - 1
    site_of = _site_of_patients(site_rng, n_patients, sites) if sites else np.zeros(n_patients, dtype=int)
    site_specs = sites or ({"name": "phantom", "start": _START},)
    sev = [_trajectory(rng, o, site_specs[site_of[i]]["start"]) for i, o in enumerate(per_patient)]

    n_img = int(k.sum())
    pat_of = np.repeat(np.arange(n_patients), k)
    s_all = np.concatenate(sev)
    anat = _sample_anatomy(rng, n_patients)
    geom = _sample_geometry(rng, n_patients)
    base = {key: v[pat_of] for key, v in {**anat, **geom}.items()}
    # positioning and exposure vary between a patient's films; anatomy does not
    jit = _sample_anatomy(rng, n_img)
    for key in ("shift_x", "shift_y", "scale", "rot", "gain", "offset", "gamma", "noise"):
        base[key] = jit[key]
    # comorbid, stable findings of a patient, and findings that follow severity
    amt = np.zeros((n_img, len(FINDINGS)), dtype=np.float32)
    lo, pn, co = _covid_amounts(s_all)
    amt[:, _f("Lung Opacity")] = lo
    amt[:, _f("Pneumonia")] = pn
    amt[:, _f("Consolidation")] = co
    cm = np.where(rng.random(n_patients) < 0.2, rng.uniform(0.2, 0.8, n_patients), 0.0)
    amt[:, _f("Cardiomegaly")] = cm[pat_of]
    for name, p_, lo_s in (("Edema", 0.35, 0.45), ("Pleural Effusion", 0.3, 0.55),
                           ("Atelectasis", 0.3, 0.5)):
        susc = np.where(rng.random(n_patients) < p_, rng.uniform(0.6, 1.0, n_patients), 0.0)[pat_of]
        amt[:, _f(name)] = np.where(s_all > lo_s, susc * (s_all - lo_s) / (1 - lo_s), 0.0)
    amt[:, _f("Support Devices")] = np.where(s_all > 0.75, 0.5, 0.0)
    base["amount"] = amt
    _apply_anatomy_findings(base)
    base["view"] = np.array(["AP"] * n_img)
    base["noise_seed"] = rng.integers(0, 2**63 - 1, size=n_img)
    pixels = _render(base, size)
    truth = _labels_from_amounts(amt)

    female = rng.random(n_patients) < 0.35
    age = _ages(rng, n_patients, 57.0, 15.0, lo=22, hi=90)
    start = date(2020, 3, 1)
    rows, img_no, pairs_count = [], 0, {WORSE: 0, STABLE: 0, IMPROVED: 0}
    first_severity = []
    for i in range(n_patients):
        pid = f"PH{i + 1:03d}"
        d0 = start + timedelta(days=int(rng.integers(0, 60)))
        dates = [d0]
        for _ in range(k[i] - 1):
            dates.append(dates[-1] + timedelta(days=int(rng.integers(1, 9))))
        names = []
        for j in range(k[i]):
            rel = f"images/{pid}_cxr{j + 1}.png"
            _write_bytes(folder / rel, _png_bytes(pixels[img_no]))
            tr = {"split": "pairs", "image": f"{PAIRS_DIRNAME}/{rel}", "patient": pid, "view": "AP",
                  "severity": float(s_all[img_no])}
            tr.update({f"amount {f}": float(amt[img_no, q]) for q, f in enumerate(FINDINGS)})
            tr.update({lab: int(truth[img_no, q]) for q, lab in enumerate(CHEXPERT_LABELS)})
            truth_rows.append(tr)
            names.append(rel)
            img_no += 1
        for j, o in enumerate(per_patient[i]):
            pairs_count[o] += 1
            first_severity.append(float(s_all[img_no - k[i] + j]))
            rows.append({
                "patient_id": pid, "pair_id": f"{pid}-{j + 1}", "first_image": names[j],
                "second_image": names[j + 1], "outcome": o,
                "first_date": dates[j].isoformat(), "second_date": dates[j + 1].isoformat(),
                "age": int(age[i]), "sex": "F" if female[i] else "M",
                "first_view": "AP", "second_view": "AP", "source": site_specs[site_of[i]]["name"],
                "notes": "synthetic phantom (covreport.phantom), not a patient",
            })
    _clinical_columns(rng, rows, np.array(first_severity))
    _write_csv(folder / "manifest.csv", MANIFEST_COLUMNS, rows)
    counts = {"pair_patients": n_patients, "pair_images": n_img, "pairs": n_pairs,
              **{f"pairs_{o}": c for o, c in pairs_count.items()}}
    if sites:
        per_site = np.repeat(site_of, k - 1)
        counts.update({f"pairs at {site['name']}": int((per_site == j).sum()) for j, site in enumerate(sites)})
    return counts


def _readme(seed, size, counts):
    lines = [
        "covreport phantom study: SYNTHETIC DATA (no real patient, no real radiograph).",
        "",
        f"seed: {seed}",
        f"image size: {size} x {size} px, 8-bit grayscale PNG",
        "",
        f"{CHEXPERT_DIRNAME}/train.csv, valid.csv: CheXpert layout and columns; Path relative to this folder.",
        "  train.csv: 1 positive, 0 negative, -1 uncertain, blank not mentioned; valid.csv: 0/1.",
        f"{PAIRS_DIRNAME}/manifest.csv: covreport pair manifest (paths relative to its folder).",
        "truth.csv: every image's ground truth (finding amounts in [0, 1], labels).",
        "",
    ]
    lines += [f"{k}: {v}" for k, v in counts.items()]
    return "\n".join(lines) + "\n"
