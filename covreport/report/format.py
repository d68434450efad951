"""Numbers and citations of the report, in one journal style.

Two number styles, chosen per report (``covreport run --style``, recorded as
``provenance.report_options.style``) and applied by every function here:

``radiology`` (the default; RSNA/AMA style, as Radiology asks of its authors)
    P values without a leading zero, two decimals from .01 on and three
    below (more when rounding would reach .05), "<.001" and ">.99", written
    "*P* = .006" in sentences; intervals "0.87, 0.99", in sentences "(95% CI:
    0.87, 0.99)"; proportions in sentences "100% (44 of 44)"; the minus sign
    U+2212; integers with thousands separators and never with ".0".
``vancouver`` (covreport's earlier style)
    p-values "<0.001", otherwise two significant digits (0.0020, 0.043,
    0.24); estimates with their CI as ``0.94 (0.84\u20130.99)``.

No negative zero in either. ``tables/*.csv`` keep full precision: only the
report rounds.

Citations are numbered in the order of first citation (Vancouver style) by
:class:`Citations`, which also links author-year mentions inside method
strings of results.json ("Mercaldo et al. 2007") to the reference list, so
every citation in the text is listed and every listed reference is cited.

References
----------
Radiological Society of North America. Radiology: instructions for authors,
statistical and number style (P values, confidence intervals). AMA Manual of
Style, 11th ed., sections 19.4 (numbers) and 20.9 (P values). Oxford
University Press; 2020.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import re

TBC = "to be completed"
METRIC_NAMES = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
                "ppv": "PPV", "npv": "NPV", "lr_positive": "LR+", "lr_negative": "LR-",
                "balanced_accuracy": "balanced accuracy", "auc": "AUC"}

#: Every work the report may cite; only those cited are listed, numbered by first citation.
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
    "korn": "Korn EL, Graubard BI. Confidence intervals for proportions with small expected number of positive "
            "counts estimated from survey data. Surv Methodol 1998;24:193-201.",
    "pepe": "Pepe MS. The Statistical Evaluation of Medical Tests for Classification and Prediction. Oxford: "
            "Oxford University Press; 2003.",
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
    "tripod_ai": "Collins GS, Moons KGM, Dhiman P, et al. TRIPOD+AI statement: updated guidance for reporting "
                 "clinical prediction models that use regression or machine learning methods. BMJ "
                 "2024;385:e078378.",
    "stard_ai": "Sounderajah V, Guni A, Liu X, et al. The STARD-AI reporting guideline for diagnostic accuracy "
                "studies using artificial intelligence. Nat Med 2025.",
    "altman_bland": "Altman DG, Bland JM. Interaction revisited: the difference between two estimates. "
                    "BMJ 2003;326:219.",
    "altman2000": "Altman DG, Machin D, Bryant TN, Gardner MJ, eds. Statistics with Confidence. 2nd ed. London: "
                  "BMJ Books; 2000.",
    "kerby": "Kerby DS. The simple difference formula: an approach to teaching nonparametric correlation. "
             "Compr Psychol 2014;3:11.IT.3.1.",
    "phipson": "Phipson B, Smyth GK. Permutation P-values should never be zero: calculating exact P-values when "
               "permutations are randomly drawn. Stat Appl Genet Mol Biol 2010;9:Article39.",
    "fisher": "Fisher RA. On the interpretation of chi-square from contingency tables, and the calculation of P. "
              "J R Stat Soc 1922;85:87-94.",
    "pearson": "Pearson K. On the criterion that a given system of deviations from the probable in the case of a "
               "correlated system of variables is such that it can be reasonably supposed to have arisen from "
               "random sampling. Philos Mag 1900;50:157-175.",
    "student": "Student. The probable error of a mean. Biometrika 1908;6:1-25.",
    "austin_smd": "Austin PC. Balance diagnostics for comparing the distribution of baseline covariates between "
                  "treatment groups in propensity-score matched samples. Stat Med 2009;28:3083-3107.",
    "tukey": "Tukey JW. Exploratory Data Analysis. Reading, MA: Addison-Wesley; 1977.",
    "obuchowski": "Obuchowski NA. Nonparametric analysis of clustered ROC curve data. Biometrics 1997;53:567-578.",
    "davison": "Davison AC, Hinkley DV. Bootstrap Methods and their Application. Cambridge: Cambridge University "
               "Press; 1997.",
    "qin": "Qin G, Hotilovac L. Comparison of non-parametric confidence intervals for the area under the ROC curve "
           "of a continuous-scale diagnostic test. Stat Methods Med Res 2008;17:207-221.",
    "pinheiro_bates": "Pinheiro JC, Bates DM. Mixed-Effects Models in S and S-PLUS. New York: Springer; 2000.",
    "pencina2008": "Pencina MJ, D'Agostino RB Sr, D'Agostino RB Jr, Vasan RS. Evaluating the added predictive ability "
                   "of a new marker: from area under the ROC curve to reclassification and beyond. Stat Med "
                   "2008;27:157-172.",
    "pencina2011": "Pencina MJ, D'Agostino RB Sr, Steyerberg EW. Extensions of net reclassification improvement "
                   "calculations to measure usefulness of new biomarkers. Stat Med 2011;30:11-21.",
    "efron_bca": "Efron B. Better bootstrap confidence intervals. J Am Stat Assoc 1987;82:171-185.",
    "satterthwaite": "Satterthwaite FE. An approximate distribution of estimates of variance components. "
                     "Biometrics Bull 1946;2:110-114.",
    "brier": "Brier GW. Verification of forecasts expressed in terms of probability. Mon Weather Rev 1950;78:1-3.",
    "cox": "Cox DR. Two further applications of a model for binary regression. Biometrika 1958;45:562-565.",
    "cleveland": "Cleveland WS. Robust locally weighted regression and smoothing scatterplots. J Am Stat Assoc "
                 "1979;74:829-836.",
    "brodersen": "Brodersen KH, Ong CS, Stephan KE, Buhmann JM. The balanced accuracy and its posterior "
                 "distribution. Proc 20th Int Conf Pattern Recognit 2010:3121-3124.",
    "vancalster": "Van Calster B, McLernon DJ, van Smeden M, Wynants L, Steyerberg EW. Calibration: the Achilles heel "
                  "of predictive analytics. BMC Med 2019;17:230.",
    "austin_ici": "Austin PC, Steyerberg EW. The Integrated Calibration Index (ICI) and related metrics for "
                  "quantifying the calibration of logistic regression models. Stat Med 2019;38:4051-4065.",
    "vickers": "Vickers AJ, Elkin EB. Decision curve analysis: a novel method for evaluating prediction models. "
               "Med Decis Making 2006;26:565-574.",
    "vickers2016": "Vickers AJ, Van Calster B, Steyerberg EW. Net benefit approaches to the evaluation of "
                   "prediction models, molecular markers, and diagnostic tests. BMJ 2016;352:i6.",
    "hodges_lehmann": "Hodges JL, Lehmann EL. Estimates of location based on rank tests. Ann Math Stat "
                      "1963;34:598-611.",
    "bauer": "Bauer DF. Constructing confidence sets using rank statistics. J Am Stat Assoc 1972;67:687-690.",
    "steiger": "Steiger JH, Fouladi RT. Noncentrality interval estimation and the evaluation of statistical "
               "models. In: Harlow LL, Mulaik SA, Steiger JH, eds. What If There Were No Significance Tests? "
               "Mahwah, NJ: Lawrence Erlbaum; 1997:221-257.",
    "laird_ware": "Laird NM, Ware JH. Random-effects models for longitudinal data. Biometrics 1982;38:963-974.",
    "jonckheere": "Jonckheere AR. A distribution-free k-sample test against ordered alternatives. Biometrika "
                  "1954;41:133-145.",
    "terpstra": "Terpstra TJ. The asymptotic normality and consistency of Kendall's test against trend, when ties "
                "are present in one ranking. Indag Math 1952;14:327-333.",
    "hollander": "Hollander M, Wolfe DA, Chicken E. Nonparametric Statistical Methods. 3rd ed. Hoboken, NJ: "
                 "Wiley; 2014.",
    "bickel_freedman": "Bickel PJ, Freedman DA. Some asymptotic theory for the bootstrap. Ann Stat "
                       "1981;9:1196-1217.",
    "buderer": "Buderer NMF. Statistical methodology: I. Incorporating the prevalence of disease into the sample "
               "size calculation for sensitivity and specificity. Acad Emerg Med 1996;3:895-900.",
    "hanley_mcneil": "Hanley JA, McNeil BJ. The meaning and use of the area under a receiver operating "
                     "characteristic (ROC) curve. Radiology 1982;143:29-36.",
    "noether": "Noether GE. Sample size determination for some common nonparametric tests. J Am Stat Assoc "
               "1987;82:645-647.",
    "riley2020": "Riley RD, Ensor J, Snell KIE, et al. Calculating the sample size required for developing a "
                 "clinical prediction model. BMJ 2020;368:m441.",
    "riley2021": "Riley RD, Van Calster B, Collins GS. A note on estimating the Cox-Snell R2 from a reported C "
                 "statistic (AUROC) to inform sample size calculations for developing a prediction model with a "
                 "binary outcome. Stat Med 2021;40:859-864.",
    "pmsampsize": "Ensor J, Martin EC, Riley RD. pmsampsize: calculates the minimum sample size required for "
                  "developing a multivariable prediction model. R package version 1.1.3; 2023.",
    "epir": "Stevenson M, Sergeant E. epiR: tools for the analysis of epidemiological data. R package version "
            "2.0.57; 2023.",
    "kish": "Kish L. Survey Sampling. New York: Wiley; 1965.",
    "dersimonian": "DerSimonian R, Laird N. Meta-analysis in clinical trials. Control Clin Trials 1986;7:177-188.",
    "paule_mandel": "Paule RC, Mandel J. Consensus values and weighting factors. J Res Natl Bur Stand "
                    "1982;87:377-385.",
    "higgins2002": "Higgins JPT, Thompson SG. Quantifying heterogeneity in a meta-analysis. Stat Med "
                   "2002;21:1539-1558.",
    "higgins2009": "Higgins JPT, Thompson SG, Spiegelhalter DJ. A re-evaluation of random-effects meta-analysis. "
                   "J R Stat Soc Ser A 2009;172:137-159.",
    "riley2011": "Riley RD, Higgins JPT, Deeks JJ. Interpretation of random effects meta-analyses. BMJ "
                 "2011;342:d549.",
    "royston2004": "Royston P, Parmar MKB, Sylvester R. Construction and validation of a prognostic model across "
                   "several studies, with an application in superficial bladder cancer. Stat Med 2004;23:907-926.",
    "steyerberg2016": "Steyerberg EW, Harrell FE Jr. Prediction models need appropriate internal, "
                      "internal-external, and external validation. J Clin Epidemiol 2016;69:245-247.",
    "debray2017": "Debray TPA, Damen JAAG, Snell KIE, et al. A guide to systematic review and meta-analysis of "
                  "prediction model performance. BMJ 2017;356:i6460.",
    "hoenig": "Hoenig JM, Heisey DM. The abuse of power: the pervasive fallacy of power calculations for data "
              "analysis. Am Stat 2001;55:19-24.",
    "whiting": "Whiting PF, Rutjes AW, Westwood ME, et al. QUADAS-2: a revised tool for the quality assessment of "
               "diagnostic accuracy studies. Ann Intern Med 2011;155:529-536.",
}

#: Author-year mentions (in method strings from results.json and in covreport's own text) -> reference key.
AUTHOR_YEAR = (
    (r"DeLong", "delong"), (r"Sun (?:&|and) Xu", "sunxu"), (r"Hedges (?:&|and) Olkin", "hedges"),
    (r"Mercaldo", "mercaldo"), (r"Simel", "simel"), (r"Altman et al\.?,? 2000|Altman,? Machin", "altman2000"),
    (r"Altman (?:&|and) Bland", "altman_bland"), (r"Clopper", "cp"), (r"Kerby", "kerby"),
    (r"Phipson", "phipson"), (r"Obuchowski", "obuchowski"), (r"Davison", "davison"), (r"Cox,? \(?1958", "cox"),
    (r"Brier", "brier"), (r"Welch", "welch"),
    (r"Satterthwaite", "satterthwaite"), (r"Efron 1987", "efron_bca"),
    (r"Qin (?:&|and) Hotilovac", "qin"), (r"Pinheiro (?:&|and) Bates", "pinheiro_bates"),
    (r"Pencina et al\.? 2008", "pencina2008"), (r"Pencina et al\.? 2011", "pencina2011"),
    (r"\bHolm\b", "holm"), (r"Benjamini", "bh"),
    (r"Mann[- ](?:&|and )?Whitney", "mw"), (r"Fisher", "fisher"), (r"Brodersen", "brodersen"),
    (r"Ojala", "ojala"), (r"Tukey", "tukey"), (r"Cleveland|[Ll]owess|LOWESS", "cleveland"),
    (r"Ambroise", "ambroise"), (r"(?<!Riley, )Van Calster", "vancalster"), (r"Gourdeau|Duchesne", "duchesne"),
    (r"Zhou et al\.? 2016", "cam"), (r"Pearson'?s? chi|chi-square test", "pearson"), (r"Student'?s? t", "student"),
    (r"Austin 2009", "austin_smd"), (r"Austin (?:&|and) Steyerberg", "austin_ici"),
    (r"Vickers (?:&|and) Elkin", "vickers"), (r"Vickers,? (?:AJ, )?Van Calster", "vickers2016"),
    (r"Hodges (?:&|and) Lehmann", "hodges_lehmann"), (r"Bauer 1972", "bauer"), (r"Steiger", "steiger"),
    (r"Laird (?:&|and) Ware", "laird_ware"), (r"Jonckheere", "jonckheere"), (r"Terpstra", "terpstra"),
    (r"Hollander", "hollander"), (r"Pepe 2003", "pepe"), (r"Korn (?:&|and) Graubard", "korn"),
    (r"Bickel (?:&|and) Freedman", "bickel_freedman"), (r"Buderer", "buderer"),
    (r"Hanley[- ](?:(?:&|and) )?McNeil", "hanley_mcneil"), (r"Noether", "noether"),
    (r"DerSimonian", "dersimonian"), (r"Paule[- ](?:(?:&|and) )?Mandel", "paule_mandel"),
    (r"Higgins (?:&|and) Thompson 2002", "higgins2002"), (r"Higgins, Thompson (?:&|and) Spiegelhalter", "higgins2009"),
    (r"Riley, Higgins (?:&|and) Deeks", "riley2011"), (r"Debray et al\.? 2017", "debray2017"),
    (r"Royston, Parmar", "royston2004"),
    (r"Steyerberg (?:&|and) Harrell", "steyerberg2016"),
    (r"Riley et al\.?,? (?:\(?BMJ )?2020|Riley RD et al", "riley2020"), (r"Riley, Van Calster", "riley2021"),
    (r"pmsampsize", "pmsampsize"), (r"\bepiR\b", "epir"), (r"\bKish\b", "kish"), (r"Hoenig", "hoenig"),
    (r"scikit-learn|sklearn", "sklearn"), (r"Cohen'?s d|Cohen,? 1988", "cohen"),
)
_AUTHOR_YEAR = [(re.compile(p), k) for p, k in AUTHOR_YEAR]
_MARK = re.compile(r"\[\[cite:([a-z0-9_,]+)\]\]")


def cite_mark(*keys):
    """A citation placeholder for text built before rendering; :meth:`Citations.resolve` numbers it."""
    return "[[cite:" + ",".join(keys) + "]]"


_SIGNS = ((re.compile(r"\+/-"), "\u00b1"), (re.compile(r"-/\+"), "\u2213"), (re.compile(r"(?<= )-(?= )"), "\u2212"),
          (re.compile(r"(?<=\()1-(?=[A-Za-z(])"), "1\u2212"), (re.compile(r">="), "\u2265"),
          (re.compile(r"<="), "\u2264"), (re.compile(r"(?<= )x(?= )"), "\u00d7"))


def math_signs(text):
    """An ASCII formula as printed: +/- as the plus-minus sign, a spaced or (1-x) minus as U+2212,
    >= and <= as the inequality signs and a spaced x as the multiplication sign."""
    for pattern, sign in _SIGNS:
        text = pattern.sub(sign, text)
    return text


class Citations:
    """Citation numbers in order of first use; ``order`` from a first rendering pass fixes them.

    The report is rendered twice: the first pass records the order in which
    works are cited, the second numbers every citation from that order and
    lists exactly the cited works.
    """

    def __init__(self, order=None):
        self.order = list(order or [])

    def number(self, key):
        if key not in REFERENCES:
            raise KeyError(f"unknown reference {key!r}")
        if key not in self.order:
            self.order.append(key)
        return self.order.index(key) + 1

    def cite(self, *keys):
        """Citation marks like ``[6, 7]``."""
        nums = sorted({self.number(k) for k in keys})
        return "[" + ", ".join(str(n) for n in nums) + "]"

    def keys_in(self, text):
        """Reference keys of the author-year mentions found in ``text``."""
        found = []
        for pattern, key in _AUTHOR_YEAR:
            if pattern.search(str(text or "")) and key not in found:
                found.append(key)
        return found

    def text(self, text):
        """``text`` with the numbers of the works it mentions by author appended (and placeholders resolved).

        Method strings are ASCII in results.json; their formulas are printed with
        the mathematical signs (:func:`math_signs`).
        """
        text = math_signs(self.resolve(text))
        keys = self.keys_in(text)
        if not keys:
            return text
        return f"{text.rstrip()} {self.cite(*keys)}"

    def resolve(self, text):
        """Replace :func:`cite_mark` placeholders by citation numbers."""
        return _MARK.sub(lambda m: self.cite(*m.group(1).split(",")), str(text or ""))

    def listed(self):
        """The cited works, in citation order: ``[{"n", "key", "text"}]``."""
        return [{"n": i + 1, "key": k, "text": REFERENCES[k]} for i, k in enumerate(self.order)]


def cite(*keys):
    """Citation marks like ``[6, 7]`` numbered in :data:`REFERENCES` order (outside a rendering)."""
    order = list(REFERENCES)
    return "[" + ", ".join(str(order.index(k) + 1) for k in keys) + "]"


# --- number formatting ---------------------------------------------------------

#: The number styles of the report; the first is the default.
STYLES = ("radiology", "vancouver")
_STYLE = contextvars.ContextVar("covreport_report_style", default=STYLES[0])
MINUS = "\u2212"


def check_style(name):
    """``name`` if it is one of :data:`STYLES` (None: the default), else ValueError naming the choices."""
    if name is None:
        return STYLES[0]
    if name not in STYLES:
        raise ValueError(f"unknown report style {name!r}; choose one of {', '.join(STYLES)}")
    return name


@contextlib.contextmanager
def use_style(name):
    """Format every number inside the ``with`` block in style ``name`` (see the module docstring)."""
    token = _STYLE.set(check_style(name))
    try:
        yield
    finally:
        _STYLE.reset(token)


def current_style():
    """The style numbers are formatted in now."""
    return _STYLE.get()


def _radiology():
    return _STYLE.get() == "radiology"


def _finite(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _minus(text):
    """A leading hyphen-minus as the minus sign U+2212 in the radiology style."""
    return MINUS + text[1:] if _radiology() and text.startswith("-") else text


def _fixed(x, nd):
    """``x`` with ``nd`` decimals and never a negative zero ("-0.000" -> "0.000")."""
    text = f"{float(x):.{nd}f}"
    if text.startswith("-") and float(text) == 0:
        text = text[1:]
    return _minus(text)


def _half_up(x, nd=0):
    """``x`` rounded half up to ``nd`` decimals, as text (87.5 -> "88", 62.5 -> "63"; Python's format rounds
    an exact half to even)."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-nd), rounding=ROUND_HALF_UP))


def _bound(x, nd):
    """A CI bound with ``nd`` decimals, or up to 3 more where a non-zero bound would print as zero (0.0037 ->
    "0.004"); a bound that is zero even then prints with ``nd`` (a prediction interval's 3e-7 -> "0.000", not
    "0.000000")."""
    text = _fixed(x, nd)
    for more in range(nd + 1, nd + 4):
        if float(x) == 0 or float(text.replace("\u2212", "-")) != 0:
            return text
        text = _fixed(x, more)
    return text if float(text.replace("\u2212", "-")) != 0 else _fixed(x, nd)


def _integer(x):
    return _minus(f"{int(x):,}")  # thousands separated, as everywhere in the report


def fmt_num(x, nd=2):
    """A number with ``nd`` decimals ("n/a" when missing); integers as integers; no negative zero."""
    if not _finite(x):
        return "n/a"
    if isinstance(x, numbers.Integral):
        return _integer(x)
    return _fixed(x, nd)


def fmt_sig(x, digits=2):
    """A number with ``digits`` significant figures, positional (0.2154 -> "0.22", 100 -> "100", 0.0001 -> "0.0001")."""
    if not _finite(x):
        return "n/a"
    import numpy as np

    return _minus(np.format_float_positional(float(x), precision=digits, unique=False, fractional=False, trim="-"))


def fmt_count(x, nd=1):
    """A count or a median of counts: an integer without ".0" when whole, else ``nd`` decimals."""
    if not _finite(x):
        return "n/a"
    return _integer(x) if float(x).is_integer() else _fixed(x, nd)


def fmt_signed(x, nd=3):
    """A difference with its sign always shown ("+0.012", "\u22120.030" in the radiology style)."""
    if not _finite(x):
        return "n/a"
    text = _fixed(x, nd)
    return text if text.startswith(("-", MINUS)) or float(text.replace(MINUS, "-")) == 0 else "+" + text


def fmt_auc(x):
    """An AUC or a proportion: 3 decimals."""
    return fmt_num(x, 3)


def fmt_ratio(x):
    """A ratio (likelihood ratio, effect size): 2 decimals."""
    return fmt_num(x, 2)


def _p_radiology(p):
    if p < 0.001:
        return "<.001"
    if p > 0.99:
        return ">.99"
    for nd in ((3,) if p < 0.01 else (2, 3, 4)):
        text = f"{p:.{nd}f}"
        if nd == 2 and text == "0.05" and p != 0.05:
            continue  # a P that two digits would print as .05 gets three (.046, .052)
        if not (p < 0.05 <= float(text)):  # never round a P below .05 up to .05
            break
    return text[1:]  # no leading zero: a P value cannot exceed 1


def fmt_p(p):
    """A p-value for a table cell: ".006", "<.001", ">.99" (radiology); "<0.001", "0.0020" (vancouver)."""
    if not _finite(p):
        return "n/a"
    if _radiology():
        return _p_radiology(min(float(p), 1.0))
    if p < 0.001:
        return "<0.001"
    return f"{min(float(p), 1.0):#.2g}".rstrip(".")


def fmt_pp(p):
    """A p-value in a sentence: "P = .006", "P < .001" (radiology); "p = 0.0060", "p < 0.001" (vancouver)."""
    text = fmt_p(p)
    letter = "P" if _radiology() else "p"
    if text == "n/a":
        return f"{letter} not available"
    if text[0] in "<>":
        return f"{letter} {text[0]} {text[1:]}"
    return f"{letter} = {text}"


def capfirst(text):
    """``text`` with its first character in upper case (the rest as it is)."""
    text = str(text or "")
    return text[:1].upper() + text[1:]


def fmt_p_below(alpha):
    """A significance level in a sentence: "P < .05" (radiology); "p < 0.05" (vancouver)."""
    return f"P < {_p_radiology(alpha)}" if _radiology() else f"p < {alpha:g}"


def fmt_ci(lo, hi, nd=3):
    """A CI: "lo, hi" (radiology); "lo\u2013hi" (an en dash), or "lo to hi" when a bound is negative (vancouver)."""
    if not (_finite(lo) and _finite(hi)):
        return "n/a"
    a, b = _bound(lo, nd), _bound(hi, nd)
    if _radiology():
        return f"{a}, {b}"
    sep = " to " if (a.startswith("-") or b.startswith("-")) else "\u2013"
    return f"{a}{sep}{b}"


def fmt_est(rec, nd=3, est="estimate", label=""):
    """``estimate (lo, hi)`` (table cells) from a record with ``estimate``/``ci_low``/``ci_high``.

    ``label`` goes before the interval inside the parentheses (:func:`fmt_est_text`).
    """
    if not rec or not _finite(rec.get(est)):
        return "n/a"
    x = float(rec[est])
    text = fmt_num(x, nd)
    if x != 0 and float(text.replace("\u2212", "-")) == 0:
        text = _bound(x, nd)                       # 0.0003, not 0.000 beside a bound of 0.0001
    if _finite(rec.get("ci_low")) and _finite(rec.get("ci_high")):
        return f"{text} ({label}{fmt_ci(rec['ci_low'], rec['ci_high'], nd)})"
    return text


def fmt_est_text(rec, nd=3, est="estimate", level=95):
    """An estimate in a sentence: "0.94 (95% CI: 0.84, 0.99)" (radiology); as :func:`fmt_est` (vancouver)."""
    return fmt_est(rec, nd, est, f"{level}% CI: " if _radiology() else "")


def fmt_prop_text(rec, k, n, nd=3):
    """A proportion in a sentence: "100% (44 of 44; 95% CI: 92%, 100%)" (radiology); :func:`fmt_est` (vancouver).

    ``k`` and ``n`` are the counts behind ``rec["estimate"]``; without them the
    radiology style falls back to :func:`fmt_est_text`.
    """
    if not _radiology():
        return fmt_est(rec, nd)
    if not (rec and _finite(rec.get("estimate")) and _finite(k) and _finite(n) and n > 0):
        return fmt_est_text(rec, nd)
    pct = lambda x: f"{_half_up(100 * float(x))}%"  # noqa: E731 - whole percentages, as Radiology prints them
    text = f"{pct(rec['estimate'])} ({_integer(k)} of {_integer(n)}"
    if _finite(rec.get("ci_low")) and _finite(rec.get("ci_high")):
        text += f"; 95% CI: {pct(rec['ci_low'])}, {pct(rec['ci_high'])}"
    return text + ")"


def fmt_pct(k, n, nd=None):
    """``k (x%)``: whole percentages below a denominator of 100, one decimal from 100 on (AMA style)."""
    if not _finite(k):
        return "n/a"
    if not _finite(n) or n == 0:
        return _integer(k) if isinstance(k, numbers.Integral) else str(k)
    nd = (0 if n < 100 else 1) if nd is None else nd
    shown = _integer(k) if float(k).is_integer() else str(k)
    return f"{shown} ({_half_up(100.0 * k / n, nd)}%)"


_P_MARK = re.compile(r"(?<![\w.&;])P(?= (?:=|&lt;|&gt;|<|>) \.?\d)")
_RAW = re.compile(r"(<(?:style|script|title|textarea)\b.*?</(?:style|script|title|textarea)>|<[^>]*>)",
                  re.IGNORECASE | re.DOTALL)


def italic_p(html):
    """``html`` with the statistic P of "P = .006" set in italics in its text (radiology style only).

    Only text between tags changes (never a tag, an attribute, a style sheet
    or the title); what is inserted is the fixed markup ``<i>P</i>``.
    """
    if not _radiology():
        return html
    parts = _RAW.split(html)
    return "".join(part if i % 2 else _P_MARK.sub("<i>P</i>", part) for i, part in enumerate(parts))


def _ci_width(rec, lo="ci_low", hi="ci_high"):
    if rec and _finite(rec.get(lo)) and _finite(rec.get(hi)):
        return rec[hi] - rec[lo]
    return None
