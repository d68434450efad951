"""The index test's training data and recipe in words, with every deviation from the original study's recipe.

STARD 2015 item 10a and the STARD-AI / CLAIM items on model development ask
for the training data and recipe; :func:`describe_training` turns the recipe
stored with the weights (``provenance.model.training``, the fields of
:class:`covreport.train.TrainConfig`) into sentences and lists where it
departs from the recipe of the original study (Duchesne, Gourdeau et al.
2020: DenseNet121 from ImageNet weights, 320 x 320 px, U-zeros, class-weighted
binary cross-entropy, Adam lr 1e-4, batch 16, 3 epochs, lowest validation
loss kept).
"""

from __future__ import annotations

#: The original study's recipe (the defaults of covreport.train.TrainConfig).
ORIGINAL_RECIPE = {"init": "imagenet", "image_size": 320, "uncertainty": "zeros", "lr": 1e-4,
                   "betas": [0.9, 0.999], "batch_size": 16, "epochs": 3}

_INIT = {"imagenet": "ImageNet weights (torchvision)", "none": "random weights"}
_UNCERTAIN = {"zeros": "negative (U-zeros)", "ones": "positive (U-ones)", "ignore": "left out of the loss (U-ignore)"}


def _init_text(init):
    init = str(init)
    return _INIT.get(init, "the weights of another checkpoint")


def _value(key, v):
    if key == "image_size":
        return f"{v} x {v} px"
    if key == "init":
        return _init_text(v)
    if key == "uncertainty":
        return _UNCERTAIN.get(str(v), str(v))
    if key == "lr":
        return f"learning rate {float(v):g}"
    if key == "betas":
        return "betas " + "/".join(f"{float(b):g}" for b in v)
    if key == "batch_size":
        return f"batch {v}"
    if key == "epochs":
        return f"{v} epoch{'s' if v != 1 else ''}"
    return str(v)


def deviations(training):
    """Phrases naming each setting that differs from :data:`ORIGINAL_RECIPE` ("64 x 64 px instead of 320 x 320 px")."""
    out = []
    for key, orig in ORIGINAL_RECIPE.items():
        if key not in (training or {}):
            continue
        v = training[key]
        same = (list(v) == list(orig)) if isinstance(orig, list) and isinstance(v, (list, tuple)) else v == orig
        if not same:
            out.append(f"{_value(key, v)} instead of {_value(key, orig)}")
    return out


def describe_training(training, *, data=None):
    """The training recipe in sentences, and its deviations from the original study.

    Parameters
    ----------
    training : dict or None
        ``provenance.model.training`` (TrainConfig fields).
    data : str, optional
        A sentence on the training data (sources, sizes), e.g. from the demo's provenance.

    Returns
    -------
    dict or None
        ``{"text": str, "deviations": [str]}``; None without a recipe.
    """
    if not isinstance(training, dict) or not training:
        return None
    t = training
    parts = [data or "The training data were a CheXpert-layout folder (train/ and valid/ with their CSVs); "
                     "the split between training and validation is the folders' (CheXpert's split is by patient, "
                     "so no patient is in both)."]
    parts.append(
        f"The DenseNet121 was initialised from {_init_text(t.get('init', 'imagenet'))} and trained on "
        f"{_value('image_size', t.get('image_size', '?'))} single-view CXRs for "
        f"{_value('epochs', t.get('epochs', '?'))} with Adam ({_value('lr', t.get('lr', 0))}, "
        f"{_value('betas', t.get('betas', [0.9, 0.999]))}, fixed), {_value('batch_size', t.get('batch_size', '?'))}, "
        f"seed {t.get('seed', '?')}; uncertain labels were {_value('uncertainty', t.get('uncertainty', 'zeros'))} "
        "and blanks negative; the loss was binary cross-entropy with a per-label positive weight of "
        "negatives / positives in the training set; no augmentation; a checkpoint was saved every epoch and the "
        "one with the lowest validation loss kept.")
    dev = deviations(t)
    if dev:
        parts.append("Deviations from the original study's recipe: " + "; ".join(dev) + ".")
    else:
        parts.append("The recipe is the original study's.")
    return {"text": " ".join(parts), "deviations": dev}


def training_text(results):
    """:func:`describe_training` of the results' recipe (None without one)."""
    prov = results.get("provenance") or {}
    model = prov.get("model") or {}
    training = model.get("training") if isinstance(model.get("training"), dict) else None
    data = None
    demo = prov.get("demo") if isinstance(prov.get("demo"), dict) else None
    if demo and isinstance(demo.get("phantom"), dict):
        ph = demo["phantom"]
        data = (f"The training data were covreport's synthetic phantom in the CheXpert layout: "
                f"{ph.get('n_train', '?')} training and {ph.get('n_valid', '?')} validation images of "
                f"{ph.get('image_size', '?')} x {ph.get('image_size', '?')} px, generated with seed "
                f"{demo.get('seed', '?')}, one source, so no duplicates across sources; training and validation "
                "images are generated separately.")
    return describe_training(training, data=data)
