"""Names defined once: labels, outcomes, manifest and scores columns."""

#: CheXpert's 14 observations, in the column order of CheXpert's CSVs.
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)

#: CheXpert's non-label columns.
CHEXPERT_META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")

#: The study's 10 labels (CheXpert's 14 without No Finding, Fracture,
#: Support Devices and Pneumothorax), in the study's order.
DEFAULT_LABELS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pleural Effusion",
    "Pleural Other",
)

#: Outcome categories of a pair (the reference standard).
WORSE, STABLE, IMPROVED = "Worse", "Stable", "Improved"
OUTCOMES = (WORSE, STABLE, IMPROVED)

#: Contrasts of the group comparisons; the first-named group is group 1.
CONTRASTS = ((WORSE, IMPROVED), (WORSE, STABLE), (STABLE, IMPROVED))

#: Their names as results.json spells them ("Worse vs Improved", ...); the first is the default primary contrast.
CONTRAST_NAMES = tuple(f"{a} vs {b}" for a, b in CONTRASTS)

#: Manifest columns.
REQUIRED_COLUMNS = ("patient_id", "first_image", "second_image", "outcome")
OPTIONAL_COLUMNS = (
    "pair_id", "first_date", "second_date", "first_offset_days", "second_offset_days",
    "age", "sex", "first_view", "second_view", "source", "notes",
)
VIEWS = ("AP", "AP Supine", "PA", "Lateral")

#: Scores file: one row per image.
IMAGE_COLUMN = "image"
FEATURE_PREFIX = "feat_"
N_FEATURES = 1024


def feature_columns(n=N_FEATURES):
    """Names of the feature columns: feat_0000 ... feat_1023."""
    return [f"{FEATURE_PREFIX}{i:04d}" for i in range(n)]


#: Exclusion stages of the STARD flow diagram (manifest and pipeline).
STAGE_INDEX_TEST_NOT_DONE = "index test not done"
STAGE_NO_REFERENCE = "reference standard not available"
EXCLUSION_STAGES = (STAGE_INDEX_TEST_NOT_DONE, STAGE_NO_REFERENCE)

#: Columns read_manifest adds to the pairs table (a manifest may not use these names).
MANIFEST_DERIVED_COLUMNS = ("first_path", "second_path", "interval_days", "line")

#: Every manifest column (given or derived): no label may take one of these names.
MANIFEST_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + MANIFEST_DERIVED_COLUMNS
