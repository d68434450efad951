"""Statistics engine: pure functions, arrays or tidy DataFrames in, tidy DataFrames out.

One module per family: :mod:`~covreport.stats.diagnostic` (2x2 accuracy
measures), :mod:`~covreport.stats.auc` (DeLong AUC, validation AUCs),
:mod:`~covreport.stats.table1` (demographics, per pair and per patient),
:mod:`~covreport.stats.groups` (group comparisons of score changes),
:mod:`~covreport.stats.clustered` (the patient as the cluster: Obuchowski's
AUC and Mann-Whitney test, cluster bootstrap), :mod:`~covreport.stats.calibration`
(Brier score, calibration intercept and slope) and the leave-one-patient-out
prediction: :mod:`~covreport.stats.lopo` (fold loop, protocols),
:mod:`~covreport.stats._logistic` (solvers), :mod:`~covreport.stats.permutation`
(permutation test) and :mod:`~covreport.stats.prediction` (the results block).
The statistics read no files: CheXpert's CSVs are read by :mod:`covreport.chexpert`.
"""

from covreport.stats._util import records
from covreport.stats.added_value import added_value, predictor_matrix
from covreport.stats.auc import (
    delong_auc,
    delong_test,
    roc_curve_points,
    validation_auc,
)
from covreport.stats.calibration import calibration
from covreport.stats.clustered import (
    cluster_bootstrap,
    group_differences_clustered,
    obuchowski_auc,
    obuchowski_compare,
    primary_analysis,
)
from covreport.stats.diagnostic import MEASURES, clopper_pearson, diagnostic_metrics
from covreport.stats.groups import compare_groups
from covreport.stats.lopo import lopo_predict
from covreport.stats.model_comparison import compare_models, reclassification
from covreport.stats.permutation import permutation_p
from covreport.stats.prediction import predict_outcome
from covreport.stats.table1 import table_one, table_one_patients

__all__ = [
    "MEASURES",
    "added_value",
    "calibration",
    "compare_models",
    "clopper_pearson",
    "cluster_bootstrap",
    "compare_groups",
    "delong_auc",
    "delong_test",
    "diagnostic_metrics",
    "group_differences_clustered",
    "lopo_predict",
    "obuchowski_auc",
    "obuchowski_compare",
    "permutation_p",
    "predictor_matrix",
    "predict_outcome",
    "primary_analysis",
    "reclassification",
    "records",
    "roc_curve_points",
    "table_one",
    "table_one_patients",
    "validation_auc",
]
