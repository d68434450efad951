"""Table 1: demographics by outcome group, counted by pair, with tests of difference.

The COVID-19 cohort is counted by pair, as the study did (a patient with k
pairs contributes k rows), with the number of distinct patients beside. An
optional reference cohort (CheXpert's ``train.csv``) is counted by patient
(the age and sex of each patient's first study) when its ``Path`` column
names the patients, else by CSV row (image).

Beside each test, the standardised mean difference (SMD) of age and of sex
(Austin 2009), which journals ask for instead of baseline p-values: it does
not depend on the sample size.

Tests (every p names its test in the ``*_method`` column beside it):

- age: Student's two-sample t-test (equal variances), with Welch's t-test
  beside it;
- sex (male vs female; unknown sex left out): Pearson's chi-square test of
  independence with Yates' continuity correction on the 2x2 table, or
  Fisher's exact test (two-sided) when an expected count is below 5.

Each outcome group is compared with the other pairs of the cohort; the
reference row carries the comparison of all pairs with the reference.

References
----------
Student. The probable error of a mean. Biometrika 1908;6:1-25.
Welch BL. The generalization of "Student's" problem when several different
population variances are involved. Biometrika 1947;34:28-35.
Yates F. Contingency tables involving small numbers and the chi-square test.
Suppl J R Stat Soc 1934;1:217-235.
Fisher RA. Statistical Methods for Research Workers, 1925.
Austin PC. Balance diagnostics for comparing the distribution of baseline
covariates between treatment groups in propensity-score matched samples.
Stat Med 2009;28:3083-3107.
"""

import math

import numpy as np
import pandas as pd
from scipy import stats as _sps

from covreport.constants import OUTCOMES
from covreport.errors import StatsError
from covreport.stats._util import show

ALL_PAIRS = "All pairs"
ALL_PATIENTS = "All patients"
OTHER_PATIENTS = "patients without a pair in this group"
REFERENCE = "Reference (CheXpert)"
OTHER_PAIRS = "other pairs"

COLUMNS = ("group", "pairs", "patients", "age_n", "age_mean", "age_sd", "male", "female",
           "sex_unknown", "p_age", "p_age_method", "p_age_welch", "p_age_welch_method",
           "p_sex", "p_sex_method", "smd_age", "smd_sex", "smd_method", "compared_with", "counted_by")

STUDENT = "Student's two-sample t-test (equal variances)"
WELCH = "Welch's two-sample t-test (unequal variances)"
YATES = "chi-square test of independence with Yates' continuity correction (2x2, sex M/F)"
FISHER = "Fisher's exact test, two-sided (2x2, sex M/F; an expected count < 5)"
SMD = ("standardised mean difference (Austin 2009): age (mean1 - mean2) / sqrt((SD1^2 + SD2^2) / 2); "
       "sex (p1 - p2) / sqrt((p1(1 - p1) + p2(1 - p2)) / 2), p the proportion male of known sex")

_SEX_CODES = {"M": "M", "F": "F"}


def _normalise_sex(values, where):
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            out.append(None)
        elif isinstance(v, str) and v.strip() == "":
            out.append(None)
        elif isinstance(v, str) and v.strip() in _SEX_CODES:
            out.append(_SEX_CODES[v.strip()])
        else:
            raise StatsError(f"{where}, row {i}: sex {show(v)} is not 'M', 'F' or blank (unknown)")
    return pd.Series(out, index=values.index, dtype=object)


def _normalise_age(values, where):
    age = pd.to_numeric(values, errors="coerce")
    bad = age.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise StatsError(f"{where}, row {i}: age {show(values.iloc[i])} is not a number")
    neg = age < 0
    if neg.any():
        i = int(np.flatnonzero(neg.to_numpy())[0])
        raise StatsError(f"{where}, row {i}: age {show(values.iloc[i])} is negative")
    return age.astype(float)


def _describe(group, df, counted_by):
    age = df["age"].dropna().to_numpy(dtype=float)
    sex = df["sex"]
    return {
        "group": group,
        "pairs": len(df) if counted_by == "pair" else None,
        "patients": int(df["patient_id"].nunique()) if "patient_id" in df.columns else None,
        "age_n": len(age),
        "age_mean": float(age.mean()) if len(age) else math.nan,
        "age_sd": float(age.std(ddof=1)) if len(age) > 1 else math.nan,
        "male": int((sex == "M").sum()),
        "female": int((sex == "F").sum()),
        "sex_unknown": int(sex.isna().sum()),
        "p_age": math.nan, "p_age_method": "", "p_age_welch": math.nan, "p_age_welch_method": "",
        "p_sex": math.nan, "p_sex_method": "", "smd_age": math.nan, "smd_sex": math.nan, "smd_method": "",
        "compared_with": "", "counted_by": counted_by,
    }


def standardized_differences(age_a, age_b, male_a, known_a, male_b, known_b):
    """Standardised mean differences of age and of the proportion male between two groups.

    Parameters
    ----------
    age_a, age_b : array-like
        Ages of the two groups (NaN left out).
    male_a, known_a, male_b, known_b : int
        Number male and number of known sex in each group.

    Returns
    -------
    tuple of float
        ``(smd_age, smd_sex)``; NaN where a group is empty or both SDs are 0.
        Signed: positive when group ``a`` is older or more often male.

    References
    ----------
    Austin PC. Balance diagnostics for comparing the distribution of baseline
    covariates between treatment groups in propensity-score matched samples.
    Stat Med 2009;28:3083-3107 (eq. 1 and 2); the formulas of ``tableone``.
    """
    a = np.asarray(age_a, dtype=float)
    b = np.asarray(age_b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    smd_age = math.nan
    if len(a) > 1 and len(b) > 1:
        pooled = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
        if pooled > 0:
            smd_age = float((a.mean() - b.mean()) / pooled)
    smd_sex = math.nan
    if known_a and known_b:
        p, q = male_a / known_a, male_b / known_b
        pooled = math.sqrt((p * (1 - p) + q * (1 - q)) / 2)
        smd_sex = float((p - q) / pooled) if pooled > 0 else (0.0 if p == q else math.nan)
    return smd_age, smd_sex


def age_tests(a, b):
    """Student's and Welch's two-sample t-tests of ages ``a`` vs ``b`` (NaN dropped).

    Returns
    -------
    dict
        ``p_age``, ``p_age_method``, ``p_age_welch``, ``p_age_welch_method``;
        a p is NaN when the test is undefined (Student: an empty group or
        fewer than 3 ages in all; Welch: a group with fewer than 2 ages; both:
        no spread in either group), and its method then says why.

    References
    ----------
    Student 1908; Welch 1947; computed with :func:`scipy.stats.ttest_ind`.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    out = {}
    for key, method, equal_var in (("p_age", STUDENT, True), ("p_age_welch", WELCH, False)):
        if equal_var and (min(len(a), len(b)) < 1 or len(a) + len(b) < 3):
            reason = f"needs at least 1 age per group and 3 in all (got {len(a)} and {len(b)})"
        elif not equal_var and min(len(a), len(b)) < 2:
            reason = f"needs at least 2 ages per group (got {len(a)} and {len(b)})"
        elif np.ptp(a) == 0 and np.ptp(b) == 0:
            reason = "is undefined when neither group has any spread in age"
        else:
            out[key], out[key + "_method"] = float(_sps.ttest_ind(a, b, equal_var=equal_var).pvalue), method
            continue
        out[key], out[key + "_method"] = math.nan, f"not computed: {method} {reason}"
    return out


def sex_test(male_a, female_a, male_b, female_b):
    """Test of sex (M/F) distribution between two groups.

    Chi-square test of independence with Yates' continuity correction on the
    2x2 table [[male_a, female_a], [male_b, female_b]], or Fisher's exact test
    (two-sided) when an expected count is below 5.

    Returns
    -------
    (float, str)
        p and the test's name (or the reason it was not computed).

    References
    ----------
    Yates 1934; Fisher 1925; :func:`scipy.stats.chi2_contingency`,
    :func:`scipy.stats.fisher_exact`.
    """
    table = np.array([[male_a, female_a], [male_b, female_b]], dtype=float)
    rows, cols, n = table.sum(axis=1), table.sum(axis=0), table.sum()
    if rows.min() == 0:
        return math.nan, "not computed: a group has no one of known sex"
    expected = np.outer(rows, cols) / n
    if expected.min() < 5:
        res = _sps.fisher_exact(table.astype(int), alternative="two-sided")
        return float(res.pvalue), FISHER
    res = _sps.chi2_contingency(table, correction=True)
    return float(res.pvalue), YATES


def _compare(row, group_df, other_df, other_name):
    row.update(age_tests(group_df["age"], other_df["age"]))
    p, method = sex_test((group_df["sex"] == "M").sum(), (group_df["sex"] == "F").sum(),
                         (other_df["sex"] == "M").sum(), (other_df["sex"] == "F").sum())
    row["p_sex"], row["p_sex_method"] = p, method
    male_a, female_a = int((group_df["sex"] == "M").sum()), int((group_df["sex"] == "F").sum())
    male_b, female_b = int((other_df["sex"] == "M").sum()), int((other_df["sex"] == "F").sum())
    row["smd_age"], row["smd_sex"] = standardized_differences(
        group_df["age"], other_df["age"], male_a, male_a + female_a, male_b, male_b + female_b)
    row["smd_method"] = SMD
    row["compared_with"] = other_name


def _checked_pairs(pairs, who):
    """The pairs' patient, outcome, age and sex, checked and normalised (a copy)."""
    need = ["patient_id", "outcome", "age", "sex"]
    missing = [c for c in need if c not in pairs.columns]
    if missing:
        raise StatsError(f"{who}: pairs lack column(s) {missing}; need {need}")
    df = pairs[need].reset_index(drop=True).copy()
    bad = ~df["outcome"].isin(OUTCOMES)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise StatsError(f"{who}: pairs, row {i}: outcome {show(df['outcome'].iloc[i])} is not one of "
                         f"{list(OUTCOMES)}")
    df["age"] = _normalise_age(df["age"], f"{who}: pairs")
    df["sex"] = _normalise_sex(df["sex"], f"{who}: pairs")
    return df


def _reference_row(reference, analysed, analysed_name, who):
    """The reference population's row, compared with all of ``analysed``.

    Counted by patient when the reference names its patients (CheXpert's
    ``Path``): each patient once, with the age and sex of its first row (its
    first study); otherwise by CSV row (image).
    """
    missing = [c for c in ("age", "sex") if c not in reference.columns]
    if missing:
        raise StatsError(f"{who}: reference lacks column(s) {missing}; need 'age' and 'sex'")
    cols = ["age", "sex"] + (["patient_id"] if "patient_id" in reference.columns else [])
    ref = reference[cols].reset_index(drop=True).copy()
    ref["age"] = _normalise_age(ref["age"], f"{who}: reference")
    ref["sex"] = _normalise_sex(ref["sex"], f"{who}: reference")
    by_patient = "patient_id" in ref.columns and ref["patient_id"].notna().all()
    if by_patient:
        ref = ref.drop_duplicates("patient_id", keep="first")
    row = _describe(REFERENCE, ref, "patient" if by_patient else "CSV row")
    _compare(row, ref, analysed, analysed_name)  # the row (the reference) minus the group named under it
    return row


def table_one(pairs, reference=None):
    """Table 1: pairs, patients, age and sex per outcome group, with tests.

    Parameters
    ----------
    pairs : pandas.DataFrame
        One row per analysed pair, columns ``patient_id``, ``outcome``
        (Worse/Stable/Improved), ``age`` (years, NaN when unknown) and ``sex``
        ('M', 'F', or None/NaN/blank when unknown).
    reference : pandas.DataFrame, optional
        A reference cohort with ``age`` and ``sex`` coded the same way (and
        ``patient_id`` if known), e.g. from :func:`covreport.chexpert.read_reference_csv`.

    Returns
    -------
    pandas.DataFrame
        Rows "All pairs", "Worse", "Stable", "Improved" and, with a
        reference, "Reference (CheXpert)". Columns group, pairs, patients,
        age_n, age_mean, age_sd (sample SD), male, female, sex_unknown,
        p_age, p_age_method, p_age_welch, p_age_welch_method, p_sex,
        p_sex_method, compared_with, counted_by ("pair", or "CSV row" for the
        reference, whose ``pairs`` is NaN). An outcome row's p compares that
        group with the other pairs; the reference row's p compares all pairs
        with the reference; the "All pairs" row carries no p. Pairs are
        counted as independent, as in the study, although pairs of one patient
        are not.

    Raises
    ------
    StatsError
        A missing column, an unknown outcome, a sex other than M/F/blank,
        or a non-numeric or negative age.
    """
    df = _checked_pairs(pairs, "table_one")

    rows = [_describe(ALL_PAIRS, df, "pair")]
    for outcome in OUTCOMES:
        in_group = df["outcome"] == outcome
        row = _describe(outcome, df[in_group], "pair")
        _compare(row, df[in_group], df[~in_group], OTHER_PAIRS)
        rows.append(row)
    if reference is not None:
        rows.append(_reference_row(reference, df, ALL_PAIRS, "table_one"))
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    # Whole numbers stay whole; the reference's pairs (and patients, when
    # unknown) are missing.
    for col in ("pairs", "patients"):
        out[col] = out[col].astype("Int64")
    return out


PATIENT_COLUMNS = COLUMNS + ("unit", "note")


def table_one_patients(pairs, reference=None):
    """Table 1 per patient: one row per patient, with the age and sex of its first pair.

    Parameters
    ----------
    pairs : pandas.DataFrame
        One row per analysed pair (columns ``patient_id``, ``outcome``,
        ``age``, ``sex``), in canonical order: a patient's first row is its
        first pair (the pipeline orders pairs by patient, then first date or
        offset, then images).
    reference : pandas.DataFrame, optional
        As in :func:`table_one` (counted by CSV row).

    Returns
    -------
    pandas.DataFrame
        Rows "All patients", "Worse", "Stable", "Improved" (and the
        reference), columns of :func:`table_one` plus ``unit`` ("patient")
        and ``note``; ``counted_by`` is "patient". A patient counts in every
        outcome group in which it has a pair (``pairs`` gives that group's
        pairs of those patients), and the note says how many count in
        several. Each outcome group is compared with the patients that have
        no pair in it (independent samples); the reference row compares all
        patients with the reference.

    References
    ----------
    As :func:`table_one`.
    """
    df = _checked_pairs(pairs, "table_one_patients")
    df["patient_id"] = df["patient_id"].astype(str)
    first = df.drop_duplicates("patient_id", keep="first").set_index("patient_id")
    groups_of = df.groupby("patient_id", sort=True)["outcome"].agg(lambda s: set(s))
    several = int((groups_of.map(len) > 1).sum())
    note = (f"{several} {'patient has' if several == 1 else 'patients have'} pairs in more than one outcome group "
            "and count in each"
            if several else None)
    patients = first.reset_index()[["patient_id", "age", "sex"]]
    rows = []
    row = _describe(ALL_PATIENTS, patients, "patient")
    row["pairs"] = len(df)
    rows.append(row)
    for outcome in OUTCOMES:
        ids = set(df.loc[df["outcome"] == outcome, "patient_id"])
        inside = patients["patient_id"].isin(ids)
        row = _describe(outcome, patients[inside], "patient")
        row["pairs"] = int((df["outcome"] == outcome).sum())
        _compare(row, patients[inside], patients[~inside], OTHER_PATIENTS)
        rows.append(row)
    if reference is not None:
        rows.append(_reference_row(reference, patients, ALL_PATIENTS, "table_one_patients"))
    for r in rows:
        r["unit"] = "patient"
        r["note"] = note if r["group"] in OUTCOMES else None
    rows[0]["note"] = "All patients: no comparison"
    out = pd.DataFrame(rows, columns=list(PATIENT_COLUMNS))
    for col in ("pairs", "patients"):
        out[col] = out[col].astype("Int64")
    return out
