"""Write the reviewer-mode example: a phantom study's manifest and its scores, no model needed.

Run from anywhere: ``python data_manifests/reviewer_example/make_example.py [OUT]``
(default: this folder). It generates covreport's synthetic phantom (seed 0,
40 patients, 60 pairs; 100 validation and 400 reference images), keeps only
the tables, and scores every image *without a network*: each label's
probability is a fixed logistic function of the phantom's true amount of
that finding plus seeded noise, and the 1,024 features are a fixed random
projection of the true amounts plus seeded noise. Rerunning it rewrites
byte-identical files. ``study.toml`` beside it is written by hand.

The scores are therefore those of an idealised model whose outputs follow
the truth; they exist so that a reviewer can run the whole analysis with one
command (see README.md here). They describe synthetic data only.
"""

import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0
N_FEATURES = 1024


def _amounts(truth_rows, labels):
    return np.array([[float(r[f"amount {lab}"]) for lab in labels] for r in truth_rows])


def _scores(images, amounts, rng, projection):
    """Probabilities (n, labels) and features (n, 1024) from the true amounts."""
    logit = -2.5 + 6.0 * amounts + rng.normal(0.0, 0.6, amounts.shape)
    prob = 1.0 / (1.0 + np.exp(-logit))
    feats = np.maximum(amounts @ projection + rng.normal(0.0, 0.3, (len(images), projection.shape[1])), 0.0)
    return prob, feats


def _write_scores(path, images, labels, prob, feats, with_features):
    header = ["image", *labels] + ([f"feat_{j:04d}" for j in range(N_FEATURES)] if with_features else [])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for i, image in enumerate(images):
            row = [image] + [f"{p:.6f}" for p in prob[i]]
            if with_features:
                row += [f"{f:.4f}" for f in feats[i]]
            w.writerow(row)


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def main(out=HERE):
    from covreport.constants import DEFAULT_LABELS
    from covreport.phantom import make_study

    out = Path(out)
    labels = list(DEFAULT_LABELS)
    rng = np.random.default_rng(SEED)
    projection = rng.normal(0.0, 1.0, (len(labels), N_FEATURES))
    with tempfile.TemporaryDirectory() as tmp:
        study = make_study(Path(tmp) / "phantom", seed=SEED, image_size=32, n_train=400, n_valid=100,
                           n_patients=40)
        truth = {r["image"]: r for r in _read(study.truth_csv)}
        manifest = _read(study.manifest)
        valid = _read(study.valid_csv)
        reference = _read(study.reference_csv)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest as the phantom wrote it (image paths relative to its folder; no image is shipped).
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(manifest[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(manifest)
    images = sorted({r[c] for r in manifest for c in ("first_image", "second_image")})
    amounts = _amounts([truth[f"covid-pairs/{i}"] for i in images], labels)
    prob, feats = _scores(images, amounts, rng, projection)
    _write_scores(out / "scores.csv", images, labels, prob, feats, with_features=True)
    # Validation set: the CheXpert-layout labels and the same idealised scores (labels only).
    with open(out / "validation.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(valid[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(valid)
    vimages = [r["Path"] for r in valid]
    vprob, vfeats = _scores(vimages, _amounts([truth[i] for i in vimages], labels), rng, projection)
    _write_scores(out / "validation_scores.csv", vimages, labels, vprob, vfeats, with_features=False)
    # Reference population of Table 1: the phantom's CheXpert-layout training set (patient, sex, age).
    with open(out / "reference.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["Path", "Sex", "Age"])
        w.writerows([r["Path"], r["Sex"], r["Age"]] for r in reference)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else HERE))
