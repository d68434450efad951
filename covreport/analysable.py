"""Which analyses of the study a set of pairs allows, before anything is computed.

``covreport validate`` uses this to say, from the manifest alone, whether
``covreport run`` has anything to analyse and which analyses will be reported
"not computed". The rules are those of the statistics themselves:

- a group comparison (Mann-Whitney U, Cohen's d) of a contrast needs at least
  :data:`MIN_GROUP_SIZE` pairs in each of its two groups
  (:func:`covreport.stats.compare_groups` reports it "not computed" otherwise);
- the prediction of Worse against Improved (leave-one-patient-out) needs
  every training fold to hold both classes: Worse pairs from at least two
  patients and Improved pairs from at least two patients. Leaving out the
  only patient with an Improved pair trains that fold on Worse pairs alone;
  :func:`covreport.stats.predict_outcome` then predicts that class for it,
  and the report's specificity, AUC and their standard errors describe a
  fold that learnt nothing.

Examples
--------
>>> import pandas as pd
>>> pairs = pd.DataFrame({"patient_id": ["P1", "P1", "P2"], "outcome": ["Worse", "Improved", "Worse"]})
>>> [a["reason"] for a in analyses(pairs) if a["analysis"] == PREDICTION]
['leaving out patient P1, the only patient with an Improved pair (1 pair), trains on Worse pairs alone; leave-one-patient-out needs Worse and Improved pairs from at least 2 patients each']
"""

from __future__ import annotations

from covreport.constants import CONTRASTS, IMPROVED, WORSE
from covreport.inputs import safe_text

#: Fewest pairs per group for a group comparison; equals covreport.stats.groups.MIN_GROUP_SIZE
#: (kept here so that ``covreport validate`` does not import scipy; a test checks they agree).
MIN_GROUP_SIZE = 2

PREDICTION = "Prediction of Worse vs Improved (leave-one-patient-out)"


def _pairs_word(n):
    return f"{n} pair" + ("" if n == 1 else "s")


def _one_class_fold(binary):
    """Why a leave-one-patient-out training fold would hold one class, or None.

    The fold that leaves out patient P trains on the other patients' pairs; it
    holds one class exactly when P is the only patient with pairs of the
    other class.
    """
    reasons = []
    for cls, other in ((IMPROVED, WORSE), (WORSE, IMPROVED)):
        owners = binary.loc[binary["outcome"] == cls, "patient_id"]
        if owners.nunique() == 1:
            reasons.append(f"leaving out patient {safe_text(str(owners.iloc[0]), limit=60)}, the only patient with "
                           f"{'an' if cls == IMPROVED else 'a'} {cls} pair ({_pairs_word(len(owners))}), trains on "
                           f"{other} pairs alone")
    if not reasons:
        return None
    return "; ".join(reasons) + "; leave-one-patient-out needs Worse and Improved pairs from at least 2 patients each"


def analyses(pairs):
    """Say which of the study's analyses can run on these pairs, and why not.

    Parameters
    ----------
    pairs : pandas.DataFrame
        The pairs that will be analysed (excluded pairs already removed), with
        the columns ``patient_id`` and ``outcome`` (Worse, Stable, Improved).

    Returns
    -------
    list of dict
        One record per analysis, in the report's order: ``analysis`` (its
        name: the contrast ``"Worse vs Improved"`` etc., or
        :data:`PREDICTION`), ``can_run`` (bool) and ``reason`` (None when it
        can run, else why not, with the counts).
    """
    outcome = pairs["outcome"]
    counts = {o: int((outcome == o).sum()) for o in set(outcome.dropna())}
    out = []
    for g1, g2 in CONTRASTS:
        short = [f"{g} has {_pairs_word(counts.get(g, 0))}" for g in (g1, g2) if counts.get(g, 0) < MIN_GROUP_SIZE]
        reason = (f"{' and '.join(short)}; a group comparison needs at least {MIN_GROUP_SIZE} pairs per group"
                  if short else None)
        out.append({"analysis": f"{g1} vs {g2}", "can_run": reason is None, "reason": reason})
    binary = pairs[outcome.isin((WORSE, IMPROVED))]
    n_worse, n_improved = counts.get(WORSE, 0), counts.get(IMPROVED, 0)
    patients = int(binary["patient_id"].nunique())
    if not n_worse or not n_improved:
        missing = " and ".join(g for g, n in ((WORSE, n_worse), (IMPROVED, n_improved)) if not n)
        reason = f"no {missing} pair; it needs at least one Worse and one Improved pair"
    elif patients < 2:
        reason = (f"the {_pairs_word(len(binary))} Worse or Improved come from 1 patient; "
                  "leave-one-patient-out needs at least 2 patients")
    else:
        reason = _one_class_fold(binary)
    out.append({"analysis": PREDICTION, "can_run": reason is None, "reason": reason})
    return out


def manifest_analyses(manifest):
    """:func:`analyses` of a manifest's analysable pairs (the pairs not excluded).

    Parameters
    ----------
    manifest : covreport.manifest.Manifest

    Returns
    -------
    n_analysable : int
        Pairs left once the exclusions are removed.
    records : list of dict
        As :func:`analyses`.
    """
    pairs = manifest.analysable_pairs()
    return int(len(pairs)), analyses(pairs)


__all__ = ["MIN_GROUP_SIZE", "PREDICTION", "analyses", "manifest_analyses"]
