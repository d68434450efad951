"""Number formatting and citations of the report, in one journal style.

References
----------
International Committee of Medical Journal Editors; and the statistical
guidelines of Radiology: p < 0.001 below it, otherwise two significant digits.
"""

from __future__ import annotations

import math
import numbers

TBC = "to be completed"
METRIC_NAMES = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
                "ppv": "PPV", "npv": "NPV", "lr_positive": "LR+", "lr_negative": "LR-"}

#: Cited works, in citation order; numbers in the report follow this order.
REFERENCES = {
    "stard": "Bossuyt PM, Reitsma JB, Bruns DE, et al. STARD 2015: an updated list of essential items for "
             "reporting diagnostic accuracy studies. BMJ 2015;351:h5527.",
    "stard_ee": "Cohen JF, Korevaar DA, Altman DG, et al. STARD 2015 guidelines for reporting diagnostic accuracy "
                "studies: explanation and elaboration. BMJ Open 2016;6:e012799.",
    "duchesne": "Duchesne S, Gourdeau D, Archambault P, et al. Tracking and predicting COVID-19 radiological "
                "trajectory using deep learning on chest X-rays: initial accuracy testing. medRxiv 2020. "
                "doi:10.1101/2020.05.01.20086207.",
    "chexpert": "Irvin J, Rajpurkar P, Ko M, et al. CheXpert: a large chest radiograph dataset with uncertainty "
                "labels and expert comparison. Proc AAAI Conf Artif Intell 2019;33:590-597.",
    "densenet": "Huang G, Liu Z, van der Maaten L, Weinberger KQ. Densely connected convolutional networks. "
                "Proc IEEE CVPR 2017:4700-4708.",
    "delong": "DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more correlated receiver "
              "operating characteristic curves: a nonparametric approach. Biometrics 1988;44:837-845.",
    "sunxu": "Sun X, Xu W. Fast implementation of DeLong's algorithm for comparing the areas under correlated "
             "receiver operating characteristic curves. IEEE Signal Process Lett 2014;21:1389-1393.",
    "mw": "Mann HB, Whitney DR. On a test of whether one of two random variables is stochastically larger than "
          "the other. Ann Math Stat 1947;18:50-60.",
    "cohen": "Cohen J. Statistical Power Analysis for the Behavioral Sciences. 2nd ed. Hillsdale, NJ: "
             "Lawrence Erlbaum; 1988.",
    "hedges": "Hedges LV, Olkin I. Statistical Methods for Meta-Analysis. Orlando, FL: Academic Press; 1985.",
    "holm": "Holm S. A simple sequentially rejective multiple test procedure. Scand J Stat 1979;6:65-70.",
    "bh": "Benjamini Y, Hochberg Y. Controlling the false discovery rate: a practical and powerful approach to "
          "multiple testing. J R Stat Soc Series B 1995;57:289-300.",
    "sklearn": "Pedregosa F, Varoquaux G, Gramfort A, et al. Scikit-learn: machine learning in Python. "
               "J Mach Learn Res 2011;12:2825-2830.",
    "ambroise": "Ambroise C, McLachlan GJ. Selection bias in gene extraction on the basis of microarray "
                "gene-expression data. Proc Natl Acad Sci USA 2002;99:6562-6566.",
    "cp": "Clopper CJ, Pearson ES. The use of confidence or fiducial limits illustrated in the case of the "
          "binomial. Biometrika 1934;26:404-413.",
    "mercaldo": "Mercaldo ND, Lau KF, Zhou XH. Confidence intervals for predictive values with an emphasis to "
                "case-control studies. Stat Med 2007;26:2170-2183.",
    "simel": "Simel DL, Samsa GP, Matchar DB. Likelihood ratios with confidence: sample size estimation for "
             "diagnostic test studies. J Clin Epidemiol 1991;44:763-770.",
    "ojala": "Ojala M, Garriga GC. Permutation tests for studying classifier performance. J Mach Learn Res "
             "2010;11:1833-1863.",
    "welch": "Welch BL. The generalization of 'Student's' problem when several different population variances "
             "are involved. Biometrika 1947;34:28-35.",
    "cam": "Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A. Learning deep features for discriminative "
           "localization. Proc IEEE CVPR 2016:2921-2929.",
    "claim": "Tejani AS, Klontzas ME, Gatti AA, et al. Checklist for Artificial Intelligence in Medical Imaging "
             "(CLAIM): 2024 update. Radiol Artif Intell 2024;6:e240300.",
    "stard_ai": "Sounderajah V, Guni A, Liu X, et al. The STARD-AI reporting guideline for diagnostic accuracy "
                "studies using artificial intelligence. Nat Med 2025.",
    "altman_bland": "Altman DG, Bland JM. Interaction revisited: the difference between two estimates. "
                    "BMJ 2003;326:219.",
}


def cite(*keys):
    """Citation marks like ``[6, 7]`` for keys of :data:`REFERENCES`."""
    order = list(REFERENCES)
    return "[" + ", ".join(str(order.index(k) + 1) for k in keys) + "]"


# --- number formatting ---------------------------------------------------------


def _finite(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x, nd=2):
    """A number with ``nd`` decimals ("n/a" when missing); integers as integers."""
    if not _finite(x):
        return "n/a"
    if isinstance(x, numbers.Integral):
        return str(int(x))
    return f"{float(x):.{nd}f}"


def fmt_auc(x):
    """An AUC or a proportion: 3 decimals."""
    return fmt_num(x, 3)


def fmt_p(p):
    """A p-value: "<0.001", else 3 significant digits ("0.0234", "0.500")."""
    if not _finite(p):
        return "n/a"
    if p < 0.001:
        return "<0.001"
    return f"{min(p, 1.0):#.3g}"


def fmt_ci(lo, hi, nd=3):
    """A 95% CI "lo-hi" (an en dash), or "lo to hi" when a bound is negative."""
    if not (_finite(lo) and _finite(hi)):
        return "n/a"
    sep = " to " if (lo < 0 or hi < 0) else "\u2013"
    return f"{lo:.{nd}f}{sep}{hi:.{nd}f}"


def fmt_est(rec, nd=3, est="estimate"):
    """``estimate (lo-hi)`` from a record with ``estimate``/``ci_low``/``ci_high``."""
    if not rec or not _finite(rec.get(est)):
        return "n/a"
    if _finite(rec.get("ci_low")) and _finite(rec.get("ci_high")):
        return f"{fmt_num(float(rec[est]), nd)} ({fmt_ci(rec['ci_low'], rec['ci_high'], nd)})"
    return fmt_num(float(rec[est]), nd)


def fmt_pct(k, n, nd=1):
    """``k (x.x%)``."""
    if not _finite(k):
        return "n/a"
    if not _finite(n) or n == 0:
        return str(k)
    return f"{k} ({100.0 * k / n:.{nd}f}%)"


def _ci_width(rec, lo="ci_low", hi="ci_high"):
    if rec and _finite(rec.get(lo)) and _finite(rec.get(hi)):
        return rec[hi] - rec[lo]
    return None

