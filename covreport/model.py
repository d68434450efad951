"""The index test: a CheXpert DenseNet121, its safe checkpoints, features and CAMs.

A covreport checkpoint is a plain dictionary written with :func:`torch.save`
and read back with ``torch.load(..., weights_only=True)``, so loading weights
never unpickles arbitrary objects::

    {"format": "covreport-checkpoint", "version": 1, "arch": "densenet121",
     "labels": [str, ...], "preprocessing": {...}, "state_dict": {name: tensor},
     "metadata": {...plain values...},          # training config, data SHA-256,
                                                # package versions, validation AUCs
     "training_state": {...} | absent}          # optimizer state (epoch checkpoints)

Weights specs accepted by :func:`load_checkpoint` and :func:`find_weights`:

- a path to a covreport checkpoint;
- ``None``: the newest checkpoint in the model folder (:func:`default_model_dir`);
- ``xrv:<name>`` (e.g. ``xrv:densenet121-res224-chex``): a torchxrayvision
  DenseNet121 whose weight file is already on disk in ``<model dir>/xrv/`` or
  torchxrayvision's cache ``~/.torchxrayvision/models_data/`` (the ``xrv``
  extra; never downloaded).

References
----------
Huang G, Liu Z, van der Maaten L, Weinberger KQ. Densely connected
convolutional networks. CVPR 2017.
Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A. Learning deep features for
discriminative localization. CVPR 2016 (class activation maps).
Cohen JP et al. TorchXRayVision: a library of chest X-ray datasets and models.
MIDL 2022.
"""

import errno
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covreport._io import sha256_file
from covreport.constants import DEFAULT_LABELS, FEATURE_PREFIX, IMAGE_COLUMN, MANIFEST_COLUMNS
from covreport.errors import ModelError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "covreport-checkpoint"
CHECKPOINT_VERSION = 1
ARCH = "densenet121"
MODEL_DIR_ENV = "COVREPORT_MODEL_DIR"
XRV_PREFIX = "xrv:"
WEIGHT_SUFFIXES = (".pt", ".pth")
#: Epoch checkpoints written by training (``NAME.epoch3.pt``): skipped by
#: :func:`default_weights`, which looks for the kept (best) checkpoint.
EPOCH_CHECKPOINT_RE = re.compile(r"\.epoch\d+$")
TRAIN_HINT = "covreport train --chexpert-root DIR --out model/densenet121.pt"
_REQUIRED_KEYS = ("format", "version", "labels", "preprocessing", "state_dict")
#: torchxrayvision names its pleural effusion output "Effusion"; CheXpert says
#: "Pleural Effusion". Other xrv names are kept as they are.
XRV_LABEL_NAMES = {"Effusion": "Pleural Effusion"}


@dataclass
class LoadedModel:
    """A model ready for scoring.

    Attributes
    ----------
    model : torch.nn.Module
        In eval mode, on the CPU; has ``.features`` and ``.classifier``.
    labels : tuple of str
        Output names, in the order of the logits.
    preprocessing : covreport.images.Preprocessing
        How images must be prepared for this model.
    sha256 : str
        SHA-256 of the weights file (goes into every output that used it).
    metadata : dict
        Plain metadata stored with the weights (training configuration,
        validation AUCs, package versions, ...).
    source : str
        The path or ``xrv:`` spec the weights came from.
    """

    model: nn.Module
    labels: tuple
    preprocessing: object
    sha256: str
    metadata: dict = field(default_factory=dict)
    source: str = ""


# --- building and running ---------------------------------------------------


#: Longest label name accepted.
MAX_LABEL_LENGTH = 100


def check_labels(labels, where="A model"):
    """The labels as a tuple, or :class:`ModelError` when they cannot name score columns.

    Each label becomes a column of the scores file and of results.json, so a
    label must be a non-empty string of printable characters (at most
    :data:`MAX_LABEL_LENGTH`), distinct from the others, and neither the
    ``image`` column nor a ``feat_*`` feature column.
    """
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise ModelError(f"{where} has invalid labels {labels!r}; expected a list of names.")
    labels = tuple(labels)
    if not labels:
        raise ModelError(f"{where} has invalid labels []: at least one label is needed.")
    for lab in labels:
        if not isinstance(lab, str) or not lab.strip():
            raise ModelError(f"{where} has invalid labels: {lab!r} is empty or not text; every label needs a name.")
        if lab.strip().lower() == IMAGE_COLUMN or lab.strip().lower().startswith(FEATURE_PREFIX):
            raise ModelError(f"{where} has invalid labels: {lab!r} is a reserved column name of scores files "
                             f"({IMAGE_COLUMN!r}, {FEATURE_PREFIX}*); rename it.")
        if lab in MANIFEST_COLUMNS:
            raise ModelError(f"{where} has invalid labels: {lab!r} is a manifest column name; rename it.")
        if len(lab) > MAX_LABEL_LENGTH or not lab.isprintable():
            raise ModelError(f"{where} has invalid labels: {lab[:MAX_LABEL_LENGTH]!r}; labels are printable "
                             f"names of at most {MAX_LABEL_LENGTH} characters.")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ModelError(f"{where} has invalid labels: {dup} duplicated; labels must be distinct.")
    return labels


def build_model(labels=DEFAULT_LABELS):
    """A randomly initialised torchvision DenseNet121 with one logit per label.

    Parameters
    ----------
    labels : sequence of str
        Output names; the classifier becomes ``Linear(1024, len(labels))``.

    Returns
    -------
    torch.nn.Module
        ``torchvision.models.densenet121(weights=None)`` with its classifier
        replaced. Its ``forward`` returns logits; probabilities are
        ``sigmoid(logits)``.
    """
    import torchvision

    labels = check_labels(labels)
    model = torchvision.models.densenet121(weights=None)
    model.classifier = nn.Linear(model.classifier.in_features, len(labels))
    return model


def _unwrap(model):
    """The plain module inside DistributedDataParallel / DataParallel / LoadedModel."""
    if isinstance(model, LoadedModel):
        model = model.model
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def features_and_logits(model, x):
    """Pooled features and logits of a batch.

    Parameters
    ----------
    model : torch.nn.Module or LoadedModel
        Anything with ``.features`` (convolutional trunk) and ``.classifier``.
    x : torch.Tensor
        Batch ``(N, C, H, W)``, prepared with the model's preprocessing.

    Returns
    -------
    features : torch.Tensor
        ``(N, 1024)``: global average pool of ``ReLU(model.features(x))``
        (the output of the last convolutional block, as in the study).
    logits : torch.Tensor
        ``(N, L)``: ``model.classifier(features)``; probabilities are
        ``torch.sigmoid(logits)``.
    """
    model = _unwrap(model)
    features = pooled_features(model, x)
    return features, model.classifier(features)


def pooled_features(model, x):
    """``(N, 1024)`` global average pool of ``ReLU(model.features(x))`` (the features of :func:`features_and_logits`)."""
    return F.adaptive_avg_pool2d(F.relu(_unwrap(model).features(x)), 1).flatten(1)


# --- checkpoints --------------------------------------------------------------


def package_versions():
    """Versions of the packages that shape a checkpoint (plain dict of str)."""
    import platform

    import torchvision

    from covreport import __version__

    return {
        "covreport": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }


def _plain(value, where="metadata"):
    """Convert ``value`` to the plain types ``weights_only`` loading accepts."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):  # str subclasses (torch.__version__) pickle as their class
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, dict):  # int keys kept (optimizer state), others become str
        return {(int(k) if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else str(k)):
                _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # a DataFrame
        return _plain(value.to_dict("records"), where)
    raise ModelError(
        f"Checkpoint {where} holds a {type(value).__name__}; only plain values "
        "(numbers, strings, lists, dicts, tensors) can be stored."
    )


def _preprocessing_dict(preprocessing):
    from covreport.images import Preprocessing

    if isinstance(preprocessing, Preprocessing):
        return preprocessing.to_dict()
    if isinstance(preprocessing, dict):
        return Preprocessing.from_dict(preprocessing).to_dict()
    raise ModelError(f"preprocessing must be a Preprocessing or a dict, not {type(preprocessing).__name__}.")


def _atomic_torch_save(obj, path):
    from covreport._io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, error_class=ModelError) as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as exc:
            # torch's zip writer reports a failed or short write (a full disk: "unexpected pos A vs B")
            # as a RuntimeError; make it the OSError atomic_write turns into a ModelError naming the file.
            raise OSError(errno.EIO, f"the write failed ({_load_failure_reason(exc)})") from None
    return path


def save_checkpoint(path, model, *, labels, preprocessing, metadata=None, training_state=None):
    """Write a covreport checkpoint atomically.

    Parameters
    ----------
    path : str or Path
        Destination; written to a temporary file in the same folder and moved
        into place whole.
    model : torch.nn.Module
        The DenseNet (DistributedDataParallel wrappers are unwrapped).
    labels : sequence of str
        Output names, in logit order.
    preprocessing : Preprocessing or dict
        The preprocessing the model was trained with.
    metadata : dict, optional
        Plain metadata (training configuration, ``train_csv_sha256``,
        ``validation_auc`` records, ...). Package versions are added under
        ``"packages"`` unless given.
    training_state : dict, optional
        Plain state needed to resume training (epoch, optimizer state dict).

    Returns
    -------
    Path
    """
    model = _unwrap(model)
    labels = [str(x) for x in labels]
    n_out = getattr(getattr(model, "classifier", None), "out_features", None)
    if n_out != len(labels):
        raise ModelError(f"The model has {n_out} outputs but {len(labels)} labels were given: {labels}.")
    meta = dict(metadata or {})
    meta.setdefault("packages", package_versions())
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": ARCH,
        "labels": labels,
        "preprocessing": _preprocessing_dict(preprocessing),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "metadata": _plain(meta),
    }
    if training_state is not None:
        payload["training_state"] = _plain(training_state, "training_state")
    return _atomic_torch_save(payload, path)


def _load_failure_reason(exc):
    """The informative line of a torch.load error (the unpickler's own reason if any)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in lines]
    specific = [ln for ln in lines if re.search(r"unsupported|blocked|not allowed|global", ln, re.I)
                and not ln.startswith(("Weights only load failed", "Check the documentation"))]
    if specific:
        reason = specific[0]
    elif lines and lines[0].startswith("Weights only load failed"):
        reason = "the file holds objects other than tensors and plain values"
    else:
        reason = lines[0] if lines else type(exc).__name__
    return reason if len(reason) <= 300 else reason[:300] + "..."


#: Largest total of tensor bytes a checkpoint may hold: its storages as the
#: archive states them before loading, and its state dict's ``numel *
#: element_size`` after. A DenseNet121 takes 31 MB in float32, about 94 MB with
#: Adam's training state, 190 MB in float64 with that state.
MAX_TENSOR_BYTES = 256 << 20
#: Largest archive member that is not tensor storage (the pickle of the
#: dictionary: labels, preprocessing, metadata), as unpacked.
MAX_PICKLE_BYTES = 16 << 20
#: Largest central directory of a checkpoint archive (DenseNet121's has about
#: a thousand entries of ~100 bytes): bounds what is parsed to list the members.
MAX_DIRECTORY_BYTES = 4 << 20
_MB = 1 << 20


def _zip_directory_size(fh, size):
    """Size in bytes of a zip archive's central directory, read from its end record (zip64 too), or None."""
    import struct

    tail_len = min(size, 22 + 0xFFFF)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    cd_size = struct.unpack_from("<I", tail, at + 12)[0]
    if cd_size == 0xFFFFFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
        offset = struct.unpack_from("<Q", tail, at - 12)[0]
        if offset + 56 > size:
            return None
        fh.seek(offset)
        record = fh.read(56)
        if record[:4] != b"PK\x06\x06":
            return None
        cd_size = struct.unpack_from("<Q", record, 40)[0]
    return cd_size


def _check_archive(fh, path):
    """Refuse, before ``torch.load``, a checkpoint file that would unpack to too much.

    ``fh`` is the checkpoint opened by :func:`_safe_torch_load` (a regular
    file within the ``"checkpoint"`` limit of :data:`covreport.inputs.LIMITS`);
    the checks run on the descriptor ``torch.load`` then reads. A zip checkpoint (torch's format) is
    judged by the sizes its central directory states: the storages
    (``*/data/*`` members) at most :data:`MAX_TENSOR_BYTES` in all, every
    other member at most :data:`MAX_PICKLE_BYTES` (torch allocates what the
    directory states; a re-deflated 1.2 MB file can state 1.2 GB). A legacy
    (non-zip) file holds its tensors as they are, so its size bounds them.
    """
    import zipfile

    from covreport.inputs import safe_text

    name = safe_text(str(path))
    size = os.fstat(fh.fileno()).st_size
    if not zipfile.is_zipfile(fh):
        if size > MAX_TENSOR_BYTES + MAX_PICKLE_BYTES:
            raise ModelError(f"Checkpoint {name} is {size / _MB:.0f} MB, more than the "
                             f"{(MAX_TENSOR_BYTES + MAX_PICKLE_BYTES) / _MB:.0f} MB a covreport "
                             "checkpoint may take; check that it is the right file.")
        return
    directory = _zip_directory_size(fh, size)
    if directory is not None and directory > MAX_DIRECTORY_BYTES:
        raise ModelError(f"Checkpoint {name} lists {directory / _MB:.0f} MB of archive entries, more than "
                         f"the {MAX_DIRECTORY_BYTES / _MB:.0f} MB a covreport checkpoint may; it is not "
                         "a checkpoint covreport wrote.")
    try:
        fh.seek(0)
        with zipfile.ZipFile(fh) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # torch.load reports the damage
    tensors = 0
    for info in members:
        parts = info.filename.split("/")
        if len(parts) >= 3 and parts[-2] == "data" and not info.is_dir():
            tensors += info.file_size
        elif info.file_size > MAX_PICKLE_BYTES:
            raise ModelError(
                f"Checkpoint {name}: its entry {safe_text(info.filename, limit=80)!r} unpacks to "
                f"{info.file_size / _MB:,.0f} MB, more than the {MAX_PICKLE_BYTES / _MB:.0f} MB the labels, "
                "preprocessing and metadata of a checkpoint may take; it is not a checkpoint covreport "
                "wrote.")
    if tensors > MAX_TENSOR_BYTES:
        raise ModelError(
            f"Checkpoint {name} holds {tensors / _MB:,.0f} MB of tensors when unpacked (the file is "
            f"{size / _MB:,.1f} MB), more than the {MAX_TENSOR_BYTES / _MB:.0f} MB a DenseNet121 "
            "checkpoint may take; it is not a checkpoint covreport wrote.")


def _safe_torch_load(path):
    """``torch.load(weights_only=True)`` of ``path`` opened through :func:`covreport.inputs.open_binary`
    (a regular file within the ``"checkpoint"`` limit) and passed by :func:`_check_archive`."""
    from covreport.inputs import open_binary

    with open_binary(path, "checkpoint", error_class=ModelError) as fh:
        _check_archive(fh, path)
        fh.seek(0)
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(fh, map_location="cpu", weights_only=True)


#: Deepest nesting of lists and mappings accepted in a checkpoint's metadata.
MAX_METADATA_DEPTH = 32


def _metadata_problem(value, where="metadata", depth=0):
    """Why a checkpoint's metadata cannot be trusted (a tensor in it, or nesting too deep), or None."""
    if isinstance(value, torch.Tensor):
        return f"holds a tensor in {where}"
    if not isinstance(value, (dict, list, tuple)):
        return None
    if depth >= MAX_METADATA_DEPTH:
        return f"has metadata nested deeper than {MAX_METADATA_DEPTH} levels (at {where})"
    for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
        found = _metadata_problem(v, f"{where}[{k!r}]", depth + 1)
        if found is not None:
            return found
    return None


def check_state_dict(state, where):
    """Refuse a state dict whose tensors are too large in all or not finite.

    The total ``numel * element_size`` (and the storages behind the tensors)
    must stay within :data:`MAX_TENSOR_BYTES`, and every floating-point
    tensor must be finite: one NaN bias makes every output NaN. Raises
    :class:`ModelError` naming the first bad tensor.
    """
    from covreport.inputs import safe_text

    total = sum(t.numel() * t.element_size() for t in state.values())
    storages = {}
    for t in state.values():
        st = t.untyped_storage()
        storages[st.data_ptr(), st.nbytes()] = st.nbytes()
    if max(total, sum(storages.values())) > MAX_TENSOR_BYTES:
        raise ModelError(f"{where} has {max(total, sum(storages.values())) / _MB:,.0f} MB of weights, more "
                         f"than the {MAX_TENSOR_BYTES / _MB:.0f} MB a DenseNet121 may take.")
    for key, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            flat = t.reshape(-1)
            first = int(torch.nonzero(~torch.isfinite(flat))[0])
            value = flat[first].item()
            raise ModelError(
                f"{where}: tensor {safe_text(key, limit=120)!r} holds a non-finite value ({value} at flat index "
                f"{first}); the weights are damaged (a diverged training run?) and every score from them "
                "would be NaN -- retrain, or use another checkpoint.")


def _read_checkpoint(path):
    """The raw checkpoint dictionary, loaded safely and validated."""
    from covreport.inputs import safe_text

    path = Path(path)
    shown = safe_text(str(path))
    if path.is_dir():
        raise ModelError(f"Weights {shown} is a folder, not a checkpoint file.")
    if not path.exists():
        raise ModelError(f"Weights file {shown} does not exist. {_where_hint()}")
    try:
        payload = _safe_torch_load(path)  # a FIFO or device is refused there, before a byte is read
    except ModelError:
        raise
    except MemoryError:
        raise ModelError(f"Checkpoint {shown} is too large to load in the memory available; "
                         "it is not a covreport checkpoint of a DenseNet121.") from None
    except Exception as exc:  # torch raises many types on junk, truncation, unsafe pickles
        reason = _load_failure_reason(exc)
        raise ModelError(
            f"{shown} is not a covreport checkpoint: it cannot be loaded safely "
            f"(torch.load with weights_only=True failed: {type(exc).__name__}: {reason}). "
            "covreport never unpickles arbitrary objects; the file may be truncated, "
            "of another program, or contain code."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            f"{shown} is not a covreport checkpoint (no 'format': '{CHECKPOINT_FORMAT}' "
            f"marker; found a {type(payload).__name__}). Train one with `{TRAIN_HINT}`, or "
            f"use {XRV_PREFIX}densenet121-res224-chex for a torchxrayvision model."
        )
    missing = [k for k in _REQUIRED_KEYS if k not in payload]
    if missing:
        raise ModelError(f"Checkpoint {shown} lacks the key(s) {missing}; the file is incomplete or damaged.")
    version = payload["version"]
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ModelError(
            f"Checkpoint {shown} has format version {safe_text(repr(version), limit=80)}; this covreport reads "
            f"versions up to {CHECKPOINT_VERSION}. Upgrade covreport."
        )
    if payload.get("arch", ARCH) != ARCH:
        arch = safe_text(repr(payload["arch"]), limit=80)
        raise ModelError(f"Checkpoint {shown} holds a {arch} model; covreport builds {ARCH}.")
    check_labels(payload["labels"], f"Checkpoint {shown}")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"Checkpoint {shown} has an invalid state_dict (not a dict of tensors).")
    check_state_dict(state, f"Checkpoint {shown}")
    problem = _metadata_problem(payload.get("metadata"))
    if problem is not None:
        raise ModelError(f"Checkpoint {shown} {safe_text(problem, limit=200)}; metadata may hold plain values "
                         "only (numbers, text, lists, mappings): it is not a checkpoint covreport wrote.")
    if not isinstance(payload["preprocessing"], dict):
        prep = safe_text(repr(payload["preprocessing"]), limit=200)
        raise ModelError(f"Checkpoint {shown} has invalid preprocessing {prep}.")
    return payload


def load_checkpoint(spec=None):
    """Load weights safely for scoring.

    Parameters
    ----------
    spec : str, Path or None
        A checkpoint path, ``None`` for :func:`default_weights`, or
        ``xrv:<name>`` for a torchxrayvision DenseNet already on disk.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelError
        If the file is missing, not a covreport checkpoint, truncated, would
        need to unpickle code, or does not fit the DenseNet121.
    """
    spec = find_weights(spec)
    if isinstance(spec, str) and spec.startswith(XRV_PREFIX):
        return _load_xrv(spec)
    from covreport.images import Preprocessing

    path = Path(spec)
    payload = _read_checkpoint(path)
    labels = tuple(payload["labels"])
    try:
        preprocessing = Preprocessing.from_dict(payload["preprocessing"])
    except Exception as exc:
        raise ModelError(f"Checkpoint {path} has invalid preprocessing: {exc}") from None
    model = build_model(labels)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        # torch's first line only says "Error(s) in loading state_dict"; the next ones name the tensors.
        detail = " ".join(ln.strip() for ln in str(exc).strip().splitlines()[1:4]) or str(exc).strip()
        raise ModelError(
            f"Checkpoint {path} does not fit a DenseNet121 with {len(labels)} labels {list(labels)}: {detail}"
        ) from None
    model.eval()
    return LoadedModel(
        model=model,
        labels=labels,
        preprocessing=preprocessing,
        sha256=sha256_file(path, what="checkpoint", error_class=ModelError),
        metadata=dict(payload.get("metadata") or {}),
        source=str(path),
    )


def read_training_state(path):
    """The checkpoint's raw dictionary including ``training_state`` (for resuming)."""
    return _read_checkpoint(path)


# --- where weights live -------------------------------------------------------


def default_model_dir():
    """The folder searched for weights: ``$COVREPORT_MODEL_DIR`` or ``./model``."""
    env = os.environ.get(MODEL_DIR_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "model"


def default_weights():
    """The newest checkpoint in :func:`default_model_dir`, or ``None``.

    Files ending in ``.pt`` or ``.pth`` count, except training's per-epoch
    files (``NAME.epochN.pt``); the newest by modification time wins.
    """
    folder = default_model_dir()
    if not folder.is_dir():
        return None
    candidates = [
        p for p in folder.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not EPOCH_CHECKPOINT_RE.search(p.stem)
        and not p.name.startswith(".")
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name))


def _where_hint():
    folder = default_model_dir()
    return (
        f"Train a model with `{TRAIN_HINT}`, put a covreport checkpoint (.pt) in {folder} "
        f"(or set {MODEL_DIR_ENV} to the folder that holds one), or pass --weights FILE "
        f"(or --weights {XRV_PREFIX}densenet121-res224-chex with torchxrayvision's weight file on disk)."
    )


def find_weights(spec=None):
    """Resolve a weights spec to a path, or keep an ``xrv:`` spec as it is.

    Raises
    ------
    ModelError
        With instructions to train or where to put weights, when ``spec`` is
        ``None`` and the model folder holds no checkpoint, or when the file
        does not exist.
    """
    if spec is None:
        found = default_weights()
        if found is None:
            raise ModelError(f"No model weights given and none found in {default_model_dir()}. {_where_hint()}")
        return found
    if isinstance(spec, str) and spec.startswith(XRV_PREFIX):
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ModelError(f"Weights {path} is a folder, not a checkpoint file.")
    if not path.exists():  # a FIFO or device exists: load_checkpoint says what it is instead
        raise ModelError(f"Weights file {path} does not exist. {_where_hint()}")
    return path


# --- torchxrayvision ------------------------------------------------------------


def xrv_preprocessing(size=224):
    """torchxrayvision's input convention expressed as a covreport Preprocessing.

    torchxrayvision models take one channel scaled to [-1024, 1024]
    (``xrv.utils.normalize``: ``(2 * v / maxval - 1) * 1024``). With covreport
    images in [0, 1] that is ``(v - 0.5) / (1 / 2048)``: mean 0.5, std
    1/2048, one channel. No adapter module is needed. Unlike
    torchxrayvision's own pipeline, the whole image is resized to
    ``size`` x ``size`` (no centre crop).
    """
    from covreport.images import Preprocessing

    return Preprocessing(size=size, resize="bilinear", mean=(0.5,), std=(1.0 / 2048.0,), channels=1)


def _xrv_safe_globals():
    from torchxrayvision import models as xm

    return [
        xm.DenseNet, xm._DenseBlock, xm._DenseLayer, xm._Transition,
        nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
        nn.Linear, set,
    ]


def _module_tensors(module, prefix=""):
    """Parameters and persistent buffers of an unpickled module, by walking its dicts.

    Walks ``_parameters``, ``_buffers`` and ``_modules`` directly so that
    modules pickled by old torch versions work too.
    """
    out = {}
    d = vars(module)
    for name, value in (d.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    for name, value in (d.get("_buffers") or {}).items():
        if value is not None and name != "op_threshs":
            out[prefix + name] = value.detach()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            out.update(_module_tensors(child, f"{prefix}{name}."))
    return out


class XRVDenseNet(nn.Module):
    """A torchxrayvision DenseNet121 reduced to its named outputs.

    ``features`` is torchxrayvision's trunk; ``classifier`` keeps the rows of
    its 18-output classifier whose label is not empty, so logits line up with
    :attr:`labels`. torchxrayvision's operating-point rescaling
    (``op_threshs``) is not applied: probabilities are ``sigmoid(logits)``.
    """

    def __init__(self, xrv_model, keep):
        super().__init__()
        self.features = xrv_model.features
        old = xrv_model.classifier
        self.classifier = nn.Linear(old.in_features, len(keep))
        with torch.no_grad():
            self.classifier.weight.copy_(old.weight[keep])
            self.classifier.bias.copy_(old.bias[keep])

    def forward(self, x):
        return features_and_logits(self, x)[1]


def _load_xrv(spec):
    name = spec[len(XRV_PREFIX):]
    try:
        with warnings.catch_warnings():  # torchxrayvision silences all warnings at import
            import torchxrayvision as xrv
    except ImportError:
        raise ModelError(
            f"--weights {spec} needs torchxrayvision: install the extra with "
            "`pip install 'covreport[xrv]'`."
        ) from None
    known = sorted(k for k in xrv.models.model_urls if k.startswith("densenet121-res224-"))
    if name not in known:
        raise ModelError(f"Unknown torchxrayvision weights {name!r} in {spec!r}; known: {', '.join(known)}.")
    info = xrv.models.model_urls[name]
    filename = os.path.basename(info["weights_url"])
    xrv_cache = Path(os.path.expanduser(xrv.utils.get_cache_dir()))
    candidates = [default_model_dir() / "xrv" / filename, xrv_cache / filename]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ModelError(
            f"torchxrayvision weights {name!r} are not on disk and covreport never downloads "
            f"them. Download {info['weights_url']} and put it at {candidates[0]} or {candidates[1]}."
        )
    try:
        with torch.serialization.safe_globals(_xrv_safe_globals()):
            obj = _safe_torch_load(path)
    except ModelError:
        raise
    except MemoryError:
        raise ModelError(f"{path} is too large to load in the memory available as torchxrayvision "
                         "weights.") from None
    except Exception as exc:
        reason = _load_failure_reason(exc)
        raise ModelError(
            f"{path} cannot be loaded safely as torchxrayvision weights "
            f"(torch.load with weights_only=True failed: {type(exc).__name__}: {reason})."
        ) from None
    if isinstance(obj, nn.Module):
        state = _module_tensors(obj)
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = {k: v for k, v in obj.items() if k != "op_threshs"}
    else:
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a torchxrayvision DenseNet or its state dict.")
    check_state_dict(state, f"torchxrayvision weights {path}")
    raw_labels = list(info["labels"])
    base = xrv.models.DenseNet(weights=None, num_classes=len(raw_labels))
    try:
        base.load_state_dict(state, strict=False)
        missing = set(base.state_dict()) - set(state) - {"op_threshs"}
        if missing:
            raise RuntimeError(f"missing {sorted(missing)[:3]}")
    except RuntimeError as exc:
        raise ModelError(f"{path} does not fit torchxrayvision's DenseNet121: {str(exc).splitlines()[0]}") from None
    keep = [i for i, lab in enumerate(raw_labels) if lab]
    labels = tuple(XRV_LABEL_NAMES.get(raw_labels[i], raw_labels[i]) for i in keep)
    model = XRVDenseNet(base, keep).eval()
    size = int(info.get("input_resolution", 224))
    return LoadedModel(
        model=model,
        labels=labels,
        preprocessing=xrv_preprocessing(size),
        sha256=sha256_file(path, what="checkpoint", error_class=ModelError),
        metadata={
            "source": "torchxrayvision",
            "weights": name,
            "weights_url": info["weights_url"],
            "xrv_labels": [raw_labels[i] for i in keep],
            "note": "sigmoid(logits); torchxrayvision's op_threshs rescaling is not applied; "
                    "whole image resized (no centre crop)",
            "packages": {"torchxrayvision": getattr(xrv, "__version__", "unknown")},
        },
        source=spec,
    )


# --- class activation maps -------------------------------------------------------


def _label_index(label, labels):
    labels = tuple(labels)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not 0 <= int(label) < len(labels):
            raise ModelError(f"Label index {label} is out of range for {len(labels)} labels.")
        return int(label)
    if label not in labels:
        raise ModelError(f"Unknown label {label!r}; the model's labels are: {', '.join(labels)}.")
    return labels.index(label)


def class_activation_map(model, image, label, *, labels=None, preprocessing=None, alpha=0.4, colormap="jet"):
    """Class activation map of one label on one image (Zhou et al. 2016).

    The map is the classifier weight vector of ``label`` times the last
    feature maps, ``sum_k w_k ReLU(features(x))_k``, upsampled bilinearly to
    the image size and min-max scaled to [0, 1] (all zeros when flat).

    Parameters
    ----------
    model : torch.nn.Module or LoadedModel
        With ``.features`` and ``.classifier``. A LoadedModel supplies
        ``labels`` and ``preprocessing``.
    image : numpy.ndarray or path
        Grayscale image ``(H, W)`` in [0, 1] (as :func:`covreport.images.load_image`
        returns), or a path to load.
    label : str or int
        Label name (or index into ``labels``).
    labels : sequence of str, optional
        The model's labels (required for a bare module).
    preprocessing : Preprocessing, optional
        Defaults to the LoadedModel's, else ``Preprocessing()``.
    alpha : float
        Weight of the colour map in the overlay.
    colormap : str
        Matplotlib colour map name.

    Returns
    -------
    heatmap : numpy.ndarray
        ``(H, W)`` float32 in [0, 1].
    overlay : numpy.ndarray
        ``(H, W, 3)`` uint8: ``(1 - alpha) * gray + alpha * colormap(heatmap)``.
    """
    from covreport.images import Preprocessing, load_image, to_tensor

    if isinstance(model, LoadedModel):
        labels = model.labels if labels is None else labels
        preprocessing = model.preprocessing if preprocessing is None else preprocessing
    if labels is None:
        raise ModelError("class_activation_map needs the model's labels (labels=...).")
    preprocessing = Preprocessing() if preprocessing is None else preprocessing
    idx = _label_index(label, labels)
    if isinstance(image, (str, Path)):
        image = load_image(image)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ModelError(f"class_activation_map needs a grayscale (H, W) image; got shape {image.shape}.")
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters())
        x = to_tensor(image, preprocessing).unsqueeze(0).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            fmap = F.relu(net.features(x))[0]  # (K, h, w)
            weight = net.classifier.weight[idx]  # (K,)
            cam = torch.einsum("k,khw->hw", weight, fmap)
            cam = F.interpolate(cam[None, None], size=image.shape, mode="bilinear", align_corners=False)[0, 0]
    finally:
        net.train(was_training)
    cam = cam.float().cpu().numpy()
    lo, hi = float(cam.min()), float(cam.max())
    heat = (cam - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(cam)
    heat = np.clip(heat, 0.0, 1.0).astype(np.float32)
    import matplotlib

    cmap = matplotlib.colormaps[colormap]
    colour = cmap(heat)[..., :3]
    gray = np.clip(image, 0.0, 1.0)[..., None].repeat(3, axis=2)
    overlay = np.clip((1.0 - alpha) * gray + alpha * colour, 0.0, 1.0)
    return heat, np.round(overlay * 255.0).astype(np.uint8)
