"""Statistics engine: pure functions, arrays or tidy DataFrames in, tidy DataFrames out.

One module per family: :mod:`~covreport.stats.diagnostic` (2x2 accuracy
measures), :mod:`~covreport.stats.auc` (DeLong AUC, validation AUCs),
:mod:`~covreport.stats.table1` (demographics), :mod:`~covreport.stats.groups`
(group comparisons of score changes) and :mod:`~covreport.stats.prediction`
(leave-one-patient-out prediction).
"""

from covreport.stats._util import records
from covreport.stats.auc import (
    delong_auc,
    delong_test,
    read_chexpert_csv,
    roc_curve_points,
    validation_auc,
)
from covreport.stats.diagnostic import MEASURES, clopper_pearson, diagnostic_metrics
from covreport.stats.groups import compare_groups
from covreport.stats.prediction import lopo_predict, permutation_p, predict_outcome
from covreport.stats.table1 import read_reference_csv, table_one

__all__ = [
    "MEASURES",
    "clopper_pearson",
    "compare_groups",
    "delong_auc",
    "delong_test",
    "diagnostic_metrics",
    "lopo_predict",
    "permutation_p",
    "predict_outcome",
    "read_chexpert_csv",
    "read_reference_csv",
    "records",
    "roc_curve_points",
    "table_one",
    "validation_auc",
]
