"""Tests of covreport.stats.table1.

Independent references: scipy.stats.ttest_ind (Student and Welch),
scipy.stats.chi2_contingency (Yates) and scipy.stats.fisher_exact, called here
on tables built with pandas; tableone's descriptive statistics; pandas counts
of CheXpert's real train.csv (shipped with torchxrayvision).
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from covreport.chexpert import read_reference_csv
from covreport.errors import CovreportError, StatsError
from covreport.stats._util import records
from covreport.stats.table1 import (
    FISHER,
    STUDENT,
    WELCH,
    YATES,
    sex_test,
    table_one,
)


def _pairs(seed=0, n_patients=40):
    """A cohort like the study's: patients with 1-3 pairs, mostly Worse."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        age = float(rng.integers(25, 90)) if rng.random() > 0.1 else np.nan
        sex = rng.choice(["M", "F", None], p=[0.55, 0.4, 0.05])
        for _ in range(rng.integers(1, 4)):
            rows.append({"patient_id": f"P{p:03d}", "age": age, "sex": sex,
                         "outcome": rng.choice(["Worse", "Stable", "Improved"], p=[0.6, 0.2, 0.2])})
    return pd.DataFrame(rows)


def _reference(seed=1, n=3000):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(60, 18, n).round().clip(0, 100),
                         "sex": rng.choice(["M", "F", None], n, p=[0.59, 0.4, 0.01]),
                         "patient_id": [f"patient{i // 3:05d}" for i in range(n)]})


def test_layout_and_counts():
    pairs, ref = _pairs(), _reference()
    t = table_one(pairs, ref)
    assert list(t.columns) == [
        "group", "pairs", "patients", "age_n", "age_mean", "age_sd", "male", "female", "sex_unknown",
        "p_age", "p_age_method", "p_age_welch", "p_age_welch_method", "p_sex", "p_sex_method",
        "smd_age", "smd_sex", "smd_method", "compared_with", "counted_by"]
    assert list(t["group"]) == ["All pairs", "Worse", "Stable", "Improved", "Reference (CheXpert)"]
    rows = t.set_index("group")
    # Reference: pandas counts and moments computed here.
    for group, sub in [("All pairs", pairs)] + [(o, pairs[pairs.outcome == o]) for o in
                                                 ("Worse", "Stable", "Improved")]:
        r = rows.loc[group]
        assert r.pairs == len(sub) and r.patients == sub.patient_id.nunique()
        assert r.age_n == sub.age.notna().sum()
        assert r.age_mean == pytest.approx(sub.age.mean(), rel=1e-12)
        assert r.age_sd == pytest.approx(sub.age.std(), rel=1e-12)
        assert (r.male, r.female, r.sex_unknown) == (
            (sub.sex == "M").sum(), (sub.sex == "F").sum(), sub.sex.isna().sum())
        assert r.counted_by == "pair"
    r = rows.loc["Reference (CheXpert)"]
    assert pd.isna(r.pairs) and r.patients == 1000 and r.counted_by == "patient"
    assert (r.male + r.female + r.sex_unknown) == 1000  # each patient once (its first row)
    by_row = table_one(pairs, ref.drop(columns="patient_id")).set_index("group").loc["Reference (CheXpert)"]
    assert by_row.counted_by == "CSV row" and (by_row.male + by_row.female + by_row.sex_unknown) == 3000
    assert rows.loc["All pairs", "p_age_method"] == "" and math.isnan(rows.loc["All pairs", "p_age"])


def test_group_p_values_against_scipy():
    pairs = _pairs(seed=3, n_patients=60)
    t = table_one(pairs).set_index("group")
    for group in ("Worse", "Stable", "Improved"):
        g, o = pairs[pairs.outcome == group], pairs[pairs.outcome != group]
        r = t.loc[group]
        # Reference: scipy.stats.ttest_ind, Student (equal_var=True) and Welch.
        assert r.p_age == pytest.approx(sps.ttest_ind(g.age.dropna(), o.age.dropna()).pvalue, rel=1e-10)
        assert r.p_age_welch == pytest.approx(
            sps.ttest_ind(g.age.dropna(), o.age.dropna(), equal_var=False).pvalue, rel=1e-10)
        assert (r.p_age_method, r.p_age_welch_method) == (STUDENT, WELCH)
        # Reference: scipy chi2_contingency with Yates, or fisher_exact when an expected count < 5.
        table = np.array([[(g.sex == "M").sum(), (g.sex == "F").sum()],
                          [(o.sex == "M").sum(), (o.sex == "F").sum()]])
        expected = sps.contingency.expected_freq(table)
        if expected.min() < 5:
            assert r.p_sex_method == FISHER
            assert r.p_sex == pytest.approx(sps.fisher_exact(table).pvalue, rel=1e-10)
        else:
            assert r.p_sex_method == YATES
            assert r.p_sex == pytest.approx(sps.chi2_contingency(table, correction=True).pvalue, rel=1e-10)
        assert r.compared_with == "other pairs"


def test_reference_row_compares_all_pairs_with_reference():
    pairs, ref = _pairs(seed=4), _reference(seed=5)
    r = table_one(pairs, ref).set_index("group").loc["Reference (CheXpert)"]
    ref = ref.drop_duplicates("patient_id")  # counted by patient: each patient's first row
    assert r.counted_by == "patient" and r.patients == len(ref) == 1000
    a, b = pairs.age.dropna(), ref.age.dropna()
    # Reference: scipy.stats.ttest_ind and chi2_contingency (Yates) on the M/F table.
    assert r.p_age == pytest.approx(sps.ttest_ind(a, b).pvalue, rel=1e-10)
    assert r.p_age_welch == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    table = [[(pairs.sex == "M").sum(), (pairs.sex == "F").sum()], [(ref.sex == "M").sum(), (ref.sex == "F").sum()]]
    assert r.p_sex == pytest.approx(sps.chi2_contingency(table, correction=True).pvalue, rel=1e-10)
    assert r.p_sex_method == YATES and r.compared_with == "All pairs"


def test_sex_test_switches_to_fisher_below_expected_5():
    # Reference: scipy.stats.fisher_exact and chi2_contingency(correction=True).
    p, method = sex_test(3, 1, 10, 12)  # expected count for (group, F) = 4 * 13/26 = 2 < 5
    assert method == FISHER and p == pytest.approx(sps.fisher_exact([[3, 1], [10, 12]]).pvalue)
    p, method = sex_test(30, 20, 40, 45)
    assert method == YATES and p == pytest.approx(sps.chi2_contingency([[30, 20], [40, 45]]).pvalue)
    p, method = sex_test(0, 0, 4, 5)
    assert math.isnan(p) and method.startswith("not computed")


@pytest.mark.filterwarnings("ignore::Warning")  # tableone's own pandas deprecation warnings
def test_matches_tableone_descriptives():
    # Reference: tableone's mean (SD) and counts per group.
    from tableone import TableOne

    pairs = _pairs(seed=7, n_patients=50)
    ours = table_one(pairs).set_index("group")
    data = pairs.assign(sex=pairs.sex.fillna("unknown"))
    t1 = TableOne(data, columns=["age", "sex"], categorical=["sex"], groupby="outcome",
                  decimals=4, pval=False).tableone
    t1.columns = [c[-1] for c in t1.columns]
    for group in ("Worse", "Stable", "Improved"):
        assert t1.loc[("age, mean (SD)", ""), group] == (
            f"{ours.loc[group, 'age_mean']:.4f} ({ours.loc[group, 'age_sd']:.4f})")
        assert t1.loc[("sex, n (%)", "M"), group].split(" ")[0] == str(ours.loc[group, "male"])
        assert t1.loc[("sex, n (%)", "unknown"), group].split(" ")[0] == str(ours.loc[group, "sex_unknown"])


def test_small_groups_not_computed_with_reason():
    pairs = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "outcome": ["Worse", "Worse", "Worse", "Stable"],
                          "age": [50, 60, 70, 40], "sex": ["M", "F", "M", None]})
    t = table_one(pairs).set_index("group")
    # Student's t is defined with 1 vs 3 ages (pooled variance); Welch's is not.
    # Reference: scipy.stats.ttest_ind.
    assert t.loc["Stable", "p_age"] == pytest.approx(sps.ttest_ind([40], [50, 60, 70]).pvalue, rel=1e-12)
    assert math.isnan(t.loc["Stable", "p_age_welch"])
    assert t.loc["Stable", "p_age_welch_method"] == ("not computed: Welch's two-sample t-test (unequal "
                                                     "variances) needs at least 2 ages per group (got 1 and 3)")
    assert t.loc["Improved", "p_age_method"] == ("not computed: Student's two-sample t-test (equal variances) "
                                                 "needs at least 1 age per group and 3 in all (got 0 and 4)")
    assert t.loc["Improved", "pairs"] == 0 and math.isnan(t.loc["Improved", "age_mean"])
    assert t.loc["Stable", "p_sex_method"] == "not computed: a group has no one of known sex"
    recs = records(t.reset_index())
    assert recs[0]["pairs"] == 4 and isinstance(recs[0]["pairs"], int)
    assert recs[3]["p_age"] is None and "p_age is missing" in recs[3]["note"]


@pytest.mark.parametrize("column,value,message", [
    ("outcome", "Better", "table_one: pairs, row 1: outcome 'Better' is not one of ['Worse', 'Stable', 'Improved']"),
    ("sex", "Male", "table_one: pairs, row 1: sex 'Male' is not 'M', 'F' or blank (unknown)"),
    ("age", "old", "table_one: pairs, row 1: age 'old' is not a number"),
    ("age", -3, "table_one: pairs, row 1: age -3 is negative"),
])
def test_bad_values_raise(column, value, message):
    pairs = _pairs().head(3).copy()
    pairs[column] = pairs[column].astype(object)
    pairs.loc[1, column] = value
    with pytest.raises(StatsError) as exc:
        table_one(pairs)
    assert str(exc.value) == message


def test_missing_column_raises():
    with pytest.raises(StatsError, match=r"pairs lack column\(s\) \['sex'\]"):
        table_one(_pairs().drop(columns="sex"))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_row_order_does_not_matter(seed):
    pairs = _pairs(seed=seed % 50, n_patients=25)
    shuffled = pairs.sample(frac=1.0, random_state=seed)
    a, b = table_one(pairs), table_one(shuffled)
    pd.testing.assert_frame_equal(a, b, rtol=1e-10)


def test_read_reference_csv_small(tmp_path):
    path = tmp_path / "train.csv"
    pd.DataFrame({"Path": ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                           "CheXpert-v1.0-small/train/patient00001/study2/view1_frontal.jpg",
                           "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"],
                  "Sex": ["Female", "Unknown", "Male"], "Age": [68, 87, None]}).to_csv(path, index=False)
    ref = read_reference_csv(path)
    assert list(ref["sex"]) == ["F", None, "M"]
    assert ref["age"].tolist()[:2] == [68.0, 87.0] and math.isnan(ref["age"].iloc[2])
    assert list(ref["patient_id"]) == ["patient00001", "patient00001", "patient00002"]
    pd.DataFrame({"Sex": ["Female", "X"], "Age": [1, 2]}).to_csv(path, index=False)
    with pytest.raises(CovreportError) as exc:
        read_reference_csv(path)
    assert str(exc.value) == (f"the reference CSV {str(path)!r}, data row 2: Sex 'X' is not Male, Female, "
                              "Unknown or blank")
    pd.DataFrame({"Gender": ["Female"], "Age": [1]}).to_csv(path, index=False)
    with pytest.raises(CovreportError, match=r"lacks column\(s\) \['Sex'\]"):
        read_reference_csv(path)
    with pytest.raises(CovreportError, match="cannot read the reference CSV"):
        read_reference_csv(tmp_path / "absent.csv")


def _chexpert_train_csv():
    spec = importlib.util.find_spec("torchxrayvision")  # locate the package without importing torch
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "chexpert_train.csv.gz"
    return path if path.exists() else None


@pytest.mark.skipif(_chexpert_train_csv() is None, reason="torchxrayvision's chexpert_train.csv.gz not installed")
def test_real_chexpert_train_csv():
    path = _chexpert_train_csv()
    ref = read_reference_csv(path)
    # Reference: pandas on the raw file, independently of read_reference_csv.
    raw = pd.read_csv(path, usecols=["Path", "Sex", "Age"])
    assert len(ref) == len(raw) == 223_414
    counts = raw["Sex"].value_counts(dropna=False)
    assert (ref["sex"] == "M").sum() == counts["Male"]
    assert (ref["sex"] == "F").sum() == counts["Female"]
    assert ref["sex"].isna().sum() == counts.get("Unknown", 0) + raw["Sex"].isna().sum()
    assert ref["age"].mean() == pytest.approx(raw["Age"].mean(), rel=1e-12)
    assert ref["patient_id"].nunique() == raw["Path"].str.split("/").str[2].nunique()
    row = table_one(_pairs(), ref).set_index("group").loc["Reference (CheXpert)"]
    # Counted by patient: each patient's first row in the file (its first study), by pandas.
    first = raw.assign(pid=raw["Path"].str.split("/").str[2]).drop_duplicates("pid")
    assert row.counted_by == "patient" and row.patients == len(first) == row.age_n
    assert row.age_mean == pytest.approx(first["Age"].mean(), rel=1e-12)
    assert row.age_sd == pytest.approx(first["Age"].std(), rel=1e-12)
    sexes = first["Sex"].value_counts(dropna=False)
    assert (row.male, row.female, row.sex_unknown) == (sexes["Male"], sexes["Female"], sexes.get("Unknown", 0))


@pytest.mark.filterwarnings("ignore::Warning")  # tableone's own pandas deprecation warnings
def test_standardised_differences_match_tableone():
    # Reference: tableone's SMD columns (smd=True) for two groups, which implement Austin 2009's
    # formulas (continuous: pooled SD of the two groups; binary: the pooled Bernoulli SD).
    from tableone import TableOne

    from covreport.stats.table1 import standardized_differences

    pairs = _pairs(seed=11, n_patients=80)
    worse = pairs.outcome == "Worse"
    data = pairs.assign(group=np.where(worse, "a", "b")).dropna(subset=["sex"])
    t1 = TableOne(data, columns=["age", "sex"], categorical=["sex"], groupby="group", smd=True,
                  pval=False, decimals=6)
    smd = t1.smd_table.iloc[:, 0]  # SMD (a,b)
    g, o = data[data.group == "a"], data[data.group == "b"]
    age, sex = standardized_differences(g.age, o.age, (g.sex == "M").sum(), len(g), (o.sex == "M").sum(), len(o))
    assert abs(age) == pytest.approx(abs(smd["age"]), rel=1e-9)
    assert abs(sex) == pytest.approx(abs(smd["sex"]), rel=1e-9)
    # Sign: positive when the first group is older.
    assert np.sign(age) == np.sign(g.age.mean() - o.age.mean())
    row = table_one(pairs).set_index("group").loc["Worse"]  # our table: Worse vs the other pairs
    rest = pairs[~worse]
    exp_age, exp_sex = standardized_differences(
        pairs[worse].age, rest.age, (pairs[worse].sex == "M").sum(), pairs[worse].sex.notna().sum(),
        (rest.sex == "M").sum(), rest.sex.notna().sum())
    assert (row.smd_age, row.smd_sex) == (pytest.approx(exp_age), pytest.approx(exp_sex))


def test_reference_row_smd_is_the_reference_minus_all_pairs():
    # The footnote's definition: the SMD of a row is that row minus the group named under it ("All pairs" for
    # the reference row), so an older, more often male reference has positive SMDs.
    pairs = pd.DataFrame({"patient_id": [f"P{i}" for i in range(8)], "outcome": ["Worse", "Improved"] * 4,
                          "age": [40, 50, 45, 55, 42, 48, 52, 44], "sex": ["F", "F", "M", "F", "F", "M", "F", "F"]})
    reference = pd.DataFrame({"age": [60, 70, 65, 75, 62, 68], "sex": ["M", "M", "F", "M", "M", "F"]})
    t1 = table_one(pairs, reference=reference)
    ref = t1[t1["group"] == "Reference (CheXpert)"].iloc[0]
    assert ref["compared_with"] == "All pairs"
    assert ref["smd_age"] > 0 and ref["smd_sex"] > 0
    a, b = reference["age"], pairs["age"]
    assert ref["smd_age"] == pytest.approx((a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2), rel=1e-12)
