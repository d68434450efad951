"""Tests of covreport.phantom: the synthetic phantom study generator.

References of the numbers checked here: the outcome counts are the original
cohort's (Duchesne et al. 2020: 44 Worse, 8 Stable, 8 Improved of 60 pairs,
40 patients); CheXpert's CSV columns are those of CheXpert-v1.0-small's
train.csv (Irvin et al. 2019; torchxrayvision's chexpert_train.csv.gz);
pixel checks compare an image with a finding against the same anatomy
without it (plain numpy means, no model).
"""

import hashlib
import itertools

import numpy as np
import pandas as pd
import pytest

from covreport.constants import CHEXPERT_LABELS, DEFAULT_LABELS, IMPROVED, OUTCOMES, STABLE, WORSE
from covreport.errors import CovreportError
from covreport.phantom import (
    _trajectory,
    CHEXPERT_COLUMNS,
    CHEXPERT_DIRNAME,
    FINDINGS,
    MANIFEST_COLUMNS,
    PAIRS_DIRNAME,
    SITES,
    make_site_study,
    make_study,
    outcome_from_change,
    render_images,
)

SMALL = dict(image_size=32, n_train=60, n_valid=30, n_patients=8)


def _digest(folder):
    """sha256 of every file (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("ph") / "study", seed=1, **SMALL)


@pytest.fixture(scope="module")
def cohort_study(tmp_path_factory):
    # the cohort's size: 40 patients -> 60 pairs
    return make_study(tmp_path_factory.mktemp("ph") / "cohort", seed=2, image_size=32,
                      n_train=20, n_valid=20, n_patients=40)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_study):
    again = make_study(tmp_path / "again", seed=1, **SMALL)
    a, b = _digest(small_study.root), _digest(again.root)
    assert a == b
    other = _digest(make_study(tmp_path / "other", seed=2, **SMALL).root)
    assert set(other) & set(a)
    differ = [k for k in set(other) & set(a) if other[k] != a[k]]
    assert "truth.csv" in differ
    assert f"{CHEXPERT_DIRNAME}/train.csv" in differ
    assert any(k.endswith(".png") for k in differ)
    # no temporary folder is left beside the study
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_layout_and_columns_are_chexpert(small_study):
    s = small_study
    assert s.chexpert_root == s.root / CHEXPERT_DIRNAME
    assert s.reference_csv == s.train_csv
    for csv in (s.train_csv, s.valid_csv):
        header = csv.read_text().splitlines()[0]
        assert header.split(",") == list(CHEXPERT_COLUMNS)
        df = pd.read_csv(csv)
        split = csv.stem
        assert df["Path"].str.match(rf"^{CHEXPERT_DIRNAME}/{split}/patient\d{{5}}/study\d+/view\d_(frontal|lateral)\.png$").all()
        # Path is relative to the CheXpert root's parent
        assert all((s.chexpert_root.parent / p).is_file() for p in df["Path"])
        assert set(df["Sex"]) <= {"Male", "Female"}
        assert df["Age"].between(18, 90).all()
        lat = df["Frontal/Lateral"] == "Lateral"
        assert set(df["Frontal/Lateral"]) <= {"Frontal", "Lateral"}
        assert df.loc[lat, "AP/PA"].isna().all()
        assert set(df.loc[~lat, "AP/PA"]) <= {"AP", "PA"}
        assert df["Path"].str.endswith("lateral.png").eq(lat).all()
    assert len(pd.read_csv(s.train_csv)) == SMALL["n_train"]
    assert len(pd.read_csv(s.valid_csv)) == SMALL["n_valid"]
    assert s.counts["train_images"] == SMALL["n_train"]
    from PIL import Image

    first = pd.read_csv(s.train_csv)["Path"].iloc[0]
    with Image.open(s.root / first) as im:
        assert im.mode == "L" and im.size == (32, 32)


def test_valid_labels_are_binary_and_match_truth(small_study):
    va = pd.read_csv(small_study.valid_csv)
    labels = va[list(CHEXPERT_LABELS)]
    assert labels.notna().all().all()
    assert set(np.unique(labels.to_numpy())) <= {0.0, 1.0}
    truth = pd.read_csv(small_study.truth_csv).set_index("image")
    t = truth.loc[va["Path"], list(CHEXPERT_LABELS)].to_numpy()
    assert (t == labels.to_numpy()).all()


def test_train_labels_have_uncertain_and_blank_at_chexpert_like_rates(tmp_path):
    s = make_study(tmp_path / "st", seed=3, image_size=32, n_train=1000, n_valid=20, n_patients=3)
    tr = pd.read_csv(s.train_csv)
    vals = tr[list(DEFAULT_LABELS)]
    unc = (vals == -1).mean()
    blank = vals.isna().mean()
    # every label has some uncertain entries, none above 12 %
    assert (unc > 0.01).all() and (unc < 0.12).all(), unc
    # overall about 5 % uncertain, most negatives blank (real CheXpert: 6.5 % / 72 %)
    assert 0.03 < unc.mean() < 0.09
    assert blank.mean() > 0.5
    assert (vals == 0).to_numpy().any()
    # No Finding is 1 or blank only, as in CheXpert
    assert set(tr["No Finding"].dropna()) == {1.0}
    # the reported label agrees with the truth except where uncertain or blank
    truth = pd.read_csv(s.truth_csv).set_index("image").loc[tr["Path"], list(DEFAULT_LABELS)].to_numpy()
    v = vals.to_numpy()
    assert (truth[v == 1] == 1).all()
    assert (truth[v == 0] == 0).all()
    # each label has positives in the training set
    assert ((v == 1).mean(0) > 0.08).all()


def test_manifest_outcomes_have_the_cohort_imbalance(cohort_study):
    m = pd.read_csv(cohort_study.manifest)
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    # Duchesne et al.: 60 pairs of 40 patients, 44 Worse / 8 Stable / 8 Improved
    assert len(m) == 60 and m["patient_id"].nunique() == 40
    assert m["outcome"].value_counts().to_dict() == {WORSE: 44, STABLE: 8, IMPROVED: 8}
    assert cohort_study.counts["pairs"] == 60
    assert (m["source"] == "phantom").all()
    assert m["notes"].str.contains("synthetic").all()
    assert m["pair_id"].is_unique
    assert set(m["sex"]) <= {"M", "F"} and set(m["first_view"]) == {"AP"}


def test_manifest_chains_dates_and_outcome_from_severity(cohort_study):
    m = pd.read_csv(cohort_study.manifest)
    truth = pd.read_csv(cohort_study.truth_csv)
    sev = dict(zip(truth["image"], truth["severity"]))
    base = f"{PAIRS_DIRNAME}/"
    for pid, g in m.groupby("patient_id", sort=False):
        assert 1 <= len(g) <= 3  # 2 to 4 images
        assert (g["second_image"].iloc[:-1].to_numpy() == g["first_image"].iloc[1:].to_numpy()).all()
        d1 = pd.to_datetime(g["first_date"])
        d2 = pd.to_datetime(g["second_date"])
        assert (d2 > d1).all()
        assert (g["second_date"].iloc[:-1].to_numpy() == g["first_date"].iloc[1:].to_numpy()).all()
        assert g["age"].nunique() == 1 and g["sex"].nunique() == 1
        for row in g.itertuples():
            change = sev[base + row.second_image] - sev[base + row.first_image]
            assert outcome_from_change(change) == row.outcome
    # the images exist, relative to the manifest's folder
    for p in set(m["first_image"]) | set(m["second_image"]):
        assert (cohort_study.manifest.parent / p).is_file()


def test_clinical_columns_carry_what_they_say(cohort_study):
    """crp carries the outcome, temperature nothing, icu_14d the first CXR's severity (phantom.CLINICAL)."""
    from scipy import stats

    m = pd.read_csv(cohort_study.manifest)
    truth = pd.read_csv(cohort_study.truth_csv)
    sev = dict(zip(truth["image"], truth["severity"]))
    first = np.array([sev[f"{PAIRS_DIRNAME}/{p}"] for p in m["first_image"]])
    med = m.groupby("outcome")["crp"].median()
    assert med[WORSE] > med[STABLE] > med[IMPROVED]
    worse, improved = m.loc[m.outcome == WORSE, "crp"], m.loc[m.outcome == IMPROVED, "crp"]
    assert stats.mannwhitneyu(worse, improved).pvalue < 0.01
    assert stats.mannwhitneyu(m.loc[m.outcome == WORSE, "temperature"],
                              m.loc[m.outcome == IMPROVED, "temperature"]).pvalue > 0.05
    assert set(m["icu_14d"]) == {"yes", "no"}
    assert first[m["icu_14d"] == "yes"].mean() > first[m["icu_14d"] == "no"].mean()


def test_outcome_from_change_threshold():
    assert outcome_from_change(0.2) == WORSE
    assert outcome_from_change(-0.2) == IMPROVED
    assert outcome_from_change(0.05) == STABLE
    assert outcome_from_change(-0.05) == STABLE
    assert set(OUTCOMES) == {WORSE, STABLE, IMPROVED}


@pytest.mark.parametrize("outcomes", [
    o for k in (1, 2, 3) for o in itertools.combinations_with_replacement((WORSE, STABLE, IMPROVED), k)
])
def test_every_sequence_of_outcomes_gets_a_trajectory(outcomes):
    # outcomes come sorted Worse -> Stable -> Improved (rise, plateau, fall)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = _trajectory(rng, list(outcomes))
        assert len(s) == len(outcomes) + 1
        assert s.min() >= 0 and s.max() <= 1
        for j, o in enumerate(outcomes):
            assert outcome_from_change(float(s[j + 1]) - float(s[j])) == o
            # the first CXR carries the prognosis: low before worsening, high before improving
            if o == WORSE:
                assert s[j] <= 0.5
            if o == IMPROVED:
                assert s[j] >= 0.6


@pytest.mark.parametrize("outcomes", [
    o for k in (1, 2, 3) for o in itertools.combinations_with_replacement((WORSE, STABLE, IMPROVED), k)
])
def test_every_sequence_of_outcomes_gets_a_trajectory_at_every_site(outcomes):
    rng = np.random.default_rng(1)
    for site in SITES:
        for _ in range(20):
            s = _trajectory(rng, list(outcomes), site["start"])
            assert s.min() >= 0 and s.max() <= 1
            for j, o in enumerate(outcomes):
                assert outcome_from_change(float(s[j + 1]) - float(s[j])) == o
                lo, hi = site["start"][o]
                assert lo <= s[j] <= hi


def test_site_study_spreads_patients_over_three_sites_one_shifted(tmp_path):
    """make_site_study: the shares of SITES, both classes at every site, Hospital C's Worse pairs start later."""
    info = make_site_study(tmp_path / "s", n_patients=40, image_size=32)
    m = pd.read_csv(info["manifest"])
    assert len(m) == info["pairs"] and m["patient_id"].nunique() == 40
    per_patient = m.groupby("patient_id")["source"].nunique()
    assert (per_patient == 1).all()                       # a patient belongs to one site
    patients = m.drop_duplicates("patient_id")["source"].value_counts().to_dict()
    assert patients == {"Hospital A": 16, "Hospital B": 14, "Hospital C": 10}   # 40/35/25% of 40
    assert {o: int(c) for o, c in m["outcome"].value_counts().items()} == {
        o: info[f"pairs_{o}"] for o in (WORSE, STABLE, IMPROVED)}
    truth = pd.read_csv(info["truth_csv"]).set_index("image")["severity"]
    first = m["first_image"].map(lambda rel: truth[f"{PAIRS_DIRNAME}/{rel}"])
    for site in SITES:
        at = m["source"] == site["name"]
        assert {WORSE, IMPROVED} <= set(m.loc[at, "outcome"])
        for o in (WORSE, IMPROVED):
            lo, hi = site["start"][o]
            assert first[at & (m["outcome"] == o)].between(lo - 1e-6, hi + 1e-6).all()
    late = first[(m["source"] == "Hospital C") & (m["outcome"] == WORSE)]
    elsewhere = first[(m["source"] != "Hospital C") & (m["outcome"] == WORSE)]
    assert late.min() >= 0.3 - 1e-6 and late.mean() > elsewhere.mean()
    assert set(m.columns) == set(MANIFEST_COLUMNS)
    # the same seed, the same bytes; an existing folder is kept
    again = make_site_study(tmp_path / "t", n_patients=40, image_size=32)
    assert _digest(tmp_path / "s") == _digest(tmp_path / "t") and again["pairs"] == info["pairs"]
    with pytest.raises(CovreportError, match="exists and is not empty"):
        make_site_study(tmp_path / "s", n_patients=40, image_size=32)


def test_manifest_readable_by_covreport(cohort_study):
    manifest = pytest.importorskip("covreport.manifest")
    man = manifest.read_manifest(cohort_study.manifest, strict=True)
    assert len(man.pairs) == 60 and len(man.exclusions) == 0
    assert man.warnings == [] and man.extra_columns == ["crp", "temperature", "icu_14d"]  # the clinical columns
    assert (man.pairs["interval_days"] >= 1).all()
    assert man.pairs["outcome"].value_counts().to_dict() == {WORSE: 44, STABLE: 8, IMPROVED: 8}
    assert all(v is None for v in man.image_status.values())


# --- ground truth in the pixels -------------------------------------------------
#
# Each image with a finding is compared with the same anatomy (same seed, same
# index) without it; the numbers are plain numpy means.

SIZE = 96
N = 12


def _pair(finding, amount=0.8, view="AP", seed=0):
    without = render_images([{}] * N, view=view, seed=seed, image_size=SIZE).astype(float)
    with_ = render_images([{finding: amount}] * N, view=view, seed=seed, image_size=SIZE).astype(float)
    return without, with_


def _rows(a, lo, hi):
    return a[:, int(lo * SIZE):int(hi * SIZE), :]


def test_effusion_whitens_the_lung_bases():
    without, with_ = _pair("Pleural Effusion")
    base = _rows(with_, 0.62, 0.80).mean((1, 2)) - _rows(without, 0.62, 0.80).mean((1, 2))
    apex = _rows(with_, 0.1, 0.3).mean((1, 2)) - _rows(without, 0.1, 0.3).mean((1, 2))
    assert (base > 3).all(), base          # brighter (denser) at the bases
    assert np.abs(apex).max() < 2           # apices unchanged (noise only)


def test_cardiomegaly_widens_the_heart():
    def heart_width(imgs):
        # at the heart's level (60 % down, 4 rows averaged against noise), the
        # pixels between the lateral chest walls brighter than the midpoint of
        # the row's 10th and 90th percentiles: heart and mediastinum, not lung
        band = imgs[:, int(0.59 * SIZE):int(0.59 * SIZE) + 4, int(0.15 * SIZE):int(0.85 * SIZE)].mean(1)
        lo, hi = np.percentile(band, [10, 90], axis=1)
        return (band > ((lo + hi) / 2)[:, None]).sum(1)

    without, with_ = _pair("Cardiomegaly", 0.9)
    assert (heart_width(with_) >= heart_width(without) + 5).all()
    # the lungs are darker without it (the heart replaces lung)
    mid = slice(SIZE // 4, 3 * SIZE // 4)
    assert with_[:, mid, mid].mean() > without[:, mid, mid].mean() + 3


@pytest.mark.parametrize("finding", ["Lung Opacity", "Consolidation", "Pneumonia", "Edema",
                                     "Atelectasis", "Lung Lesion", "Pleural Other",
                                     "Enlarged Cardiomediastinum"])
def test_each_finding_adds_density(finding):
    without, with_ = _pair(finding, 0.8)
    diff = (with_ - without).mean((1, 2))
    assert (diff > 0.15).all(), (finding, diff)


def test_consolidation_is_denser_than_ground_glass_and_grows_with_amount():
    _, gg = _pair("Lung Opacity", 0.6)
    without, co = _pair("Consolidation", 0.6)
    # densest 1 % of pixels gained
    def top_gain(x):
        return np.percentile(x - without, 99, axis=(1, 2))
    assert np.median(top_gain(co)) > np.median(top_gain(gg))
    amounts = [0.2, 0.5, 0.9]
    gains = [(_pair("Lung Opacity", a)[1] - without).mean() for a in amounts]
    assert gains[0] < gains[1] < gains[2]


def test_laterals_render_and_differ_from_frontals():
    lat = render_images([{}] * 4, view="Lateral", seed=0, image_size=SIZE)
    ap = render_images([{}] * 4, view="AP", seed=0, image_size=SIZE)
    assert lat.shape == ap.shape == (4, SIZE, SIZE) and lat.dtype == np.uint8
    assert np.abs(lat.astype(float) - ap).mean() > 10
    without, with_ = _pair("Pleural Effusion", view="Lateral")
    assert (with_ - without).mean() > 0.5


def test_every_finding_is_known():
    assert FINDINGS == CHEXPERT_LABELS[1:]
    with pytest.raises(CovreportError, match="unknown finding 'Covid'"):
        render_images([{"Covid": 1.0}])


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "st"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CovreportError, match="exists and is not empty.*overwrite=True"):
        make_study(out, **SMALL)
    assert (out / "keep.txt").exists()
    s = make_study(out, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists() and s.manifest.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


@pytest.mark.parametrize("kw, msg", [
    ({"image_size": 16}, "image_size=16"),
    ({"n_train": 5}, "n_train=5"),
    ({"n_patients": 1}, "n_patients=1"),
    ({"lateral_fraction": 0.9}, "lateral_fraction=0.9"),
])
def test_bad_settings_are_refused(tmp_path, kw, msg):
    with pytest.raises(CovreportError, match=msg):
        make_study(tmp_path / "x", **{**SMALL, **kw})
    assert not (tmp_path / "x").exists()
