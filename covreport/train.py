"""Training the index test on CheXpert: the study's recipe, resumable, single or multi-process.

The recipe (Duchesne, Gourdeau et al. 2020; defaults of :class:`TrainConfig`):
DenseNet121 initialised from ImageNet, 320 x 320 input, all single views
(frontal and lateral), uncertain labels as negative ("U-zeros"), blank as
negative, class-weighted binary cross-entropy, Adam (lr 1e-4 fixed, betas
0.9/0.999), batch 16, 3 epochs, a checkpoint every epoch and the one with the
lowest validation loss kept.

Class weighting: per label ``j``, ``pos_weight_j = n_neg_j / n_pos_j``
counted on the training rows after the uncertainty policy (masked entries
not counted), used as :class:`torch.nn.BCEWithLogitsLoss`'s ``pos_weight``;
the loss is the mean over the unmasked (image, label) entries.

Files written (``out = DIR/NAME.pt``):

- ``DIR/NAME.epoch<N>.pt``: every epoch, with the optimizer state (for ``resume``
  after an interruption); deleted once the run completes, unless ``keep_epochs``;
- ``DIR/NAME.pt``: the epoch with the lowest validation loss (no optimizer state);
- ``DIR/NAME.validation_auc.csv``: its per-label validation AUCs with DeLong CIs;
- ``DIR/NAME.validation_scores.csv``: its validation probabilities
  (``image`` = the CSV's ``Path``, one column per label).

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set, world size > 1) training
runs with DistributedDataParallel (gloo on CPU, nccl on GPU) and a
DistributedSampler; ``batch_size`` is per process; rank 0 validates and writes.

References
----------
Irvin J, Rajpurkar P, Ko M, et al. CheXpert: a large chest radiograph dataset
with uncertainty labels and expert comparison. AAAI 2019 (U-zeros, U-ones,
U-ignore policies).
"""

import dataclasses
import datetime
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from covreport import _threads
from covreport import progress as _progress
from covreport._io import write_csv_atomic
from covreport.chexpert import read_chexpert_split
from covreport.constants import DEFAULT_LABELS
from covreport.errors import ModelError
from covreport.model import (
    _atomic_torch_save,
    _plain,
    _unwrap,
    build_model,
    read_training_state,
    save_checkpoint,
    sha256_file,
)

logger = logging.getLogger(__name__)

UNCERTAINTY_POLICIES = ("zeros", "ones", "ignore")
INIT_KEYWORDS = ("imagenet", "none")
MIN_IMAGE_SIZE = 64
LOSS_DESCRIPTION = (
    "binary cross-entropy with logits, per-label pos_weight = n_neg / n_pos counted on the "
    "training rows after the uncertainty policy (masked entries not counted); mean over "
    "unmasked (image, label) entries"
)


@dataclass
class TrainConfig:
    """Training options; the defaults are the study's recipe.

    Attributes
    ----------
    labels : tuple of str
        CheXpert label columns to learn, in output order.
    uncertainty : {"zeros", "ones", "ignore"}
        Uncertain (-1) labels become 0, 1, or are left out of the loss.
    image_size : int
        Square input side in pixels.
    epochs, batch_size : int
        ``batch_size`` is per process under torchrun.
    lr : float
        Adam's fixed learning rate.
    betas : tuple of float
        Adam's betas.
    init : str
        ``"imagenet"`` (torchvision's weights), ``"none"`` (random) or the
        path of a covreport checkpoint or DenseNet121 state dict.
    seed : int
        Seeds model initialisation, shuffling and the ``max_images`` sample.
    max_images : int or None
        Train and validate on at most this many images (a seeded random
        sample of each CSV), for small runs.
    num_workers : int or None
        DataLoader worker processes decoding images; None chooses: on a CPU
        none up to 4 cores (the training's threads need them all; see
        :func:`covreport._threads.cpu_workers`), on a GPU ``min(4, cores)``.
    device : str or None
        ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
    """

    labels: tuple = DEFAULT_LABELS
    uncertainty: str = "zeros"
    image_size: int = 320
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    init: str = "imagenet"
    seed: int = 0
    max_images: int = None
    num_workers: int = None
    device: str = None

    def __post_init__(self):
        self.labels = tuple(str(x) for x in self.labels)
        self.betas = tuple(float(b) for b in self.betas)
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ModelError(f"Training labels must be distinct and at least one; got {list(self.labels)}.")
        if self.uncertainty not in UNCERTAINTY_POLICIES:
            raise ModelError(f"Uncertainty policy must be one of {', '.join(UNCERTAINTY_POLICIES)}; "
                             f"got {self.uncertainty!r}.")
        for name, low in (("image_size", MIN_IMAGE_SIZE), ("epochs", 1), ("batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if name == "num_workers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ModelError(f"{name} must be an integer >= {low}; got {value!r}.")
        if self.max_images is not None and (not isinstance(self.max_images, (int, np.integer)) or self.max_images < 1):
            raise ModelError(f"max_images must be a positive integer or None; got {self.max_images!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ModelError(f"lr must be positive; got {self.lr!r}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ModelError(f"betas must be two numbers in [0, 1); got {self.betas!r}.")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ModelError(f"device must be 'cpu', 'cuda' or None; got {self.device!r}.")
        self.init = str(self.init)

    def to_dict(self):
        """Plain form stored in checkpoints."""
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["betas"] = list(self.betas)
        return d


# --- CheXpert CSVs and labels ---------------------------------------------------


def label_targets(df, labels=DEFAULT_LABELS, uncertainty="zeros", *, source="the CSV"):
    """Training targets and loss mask from CheXpert label columns.

    Parameters
    ----------
    df : pandas.DataFrame
        Label columns holding 1 (positive), 0 (negative), -1 (uncertain) or
        blank (not mentioned).
    labels : sequence of str
    uncertainty : {"zeros", "ones", "ignore"}
        U-zeros: -1 -> 0; U-ones: -1 -> 1; ignore: -1 left out of the loss
        (mask False, target 0). Blank is always a negative (0, counted).
    source : str
        Name used in error messages.

    Returns
    -------
    targets : torch.Tensor
        float32 ``(N, L)`` of 0 and 1.
    mask : torch.Tensor
        bool ``(N, L)``; False where an entry is left out of the loss.
    """
    if uncertainty not in UNCERTAINTY_POLICIES:
        raise ModelError(f"Uncertainty policy must be one of {', '.join(UNCERTAINTY_POLICIES)}; got {uncertainty!r}.")
    labels = list(labels)
    missing = [lab for lab in labels if lab not in df.columns]
    if missing:
        raise ModelError(f"{source} lacks label column(s) {missing}.")
    values = np.empty((len(df), len(labels)), dtype=np.float64)
    for j, lab in enumerate(labels):
        raw = df[lab]
        col = pd.to_numeric(raw, errors="coerce")
        blank = raw.isna() | (raw.astype(str).str.strip() == "")
        bad = (col.isna() & ~blank) | (col.notna() & ~col.isin([1.0, 0.0, -1.0]))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            value = raw.iloc[i]
            value = value.item() if isinstance(value, np.generic) else value
            raise ModelError(f"{source}, data row {i + 1}, column {lab!r}: {value!r} is not "
                             "1 (positive), 0 (negative), -1 (uncertain) or blank.")
        values[:, j] = col.to_numpy(dtype=np.float64)
    uncertain = values == -1.0
    targets = (values == 1.0)
    if uncertainty == "ones":
        targets = targets | uncertain
    mask = ~uncertain if uncertainty == "ignore" else np.ones_like(uncertain)
    return torch.from_numpy(targets.astype(np.float32)), torch.from_numpy(mask)


def pos_weights(targets, mask, labels=None):
    """Per-label ``n_neg / n_pos`` over unmasked entries (1.0 for a label with no positive)."""
    m = mask.to(torch.float64)
    t = targets.to(torch.float64)
    n_pos = (t * m).sum(0)
    n_neg = ((1 - t) * m).sum(0)
    w = torch.where(n_pos > 0, n_neg / n_pos.clamp_min(1), torch.ones_like(n_pos))
    for j in torch.nonzero(n_pos == 0).flatten().tolist():
        name = labels[j] if labels is not None else j
        logger.warning("label %r has no positive training example; its pos_weight is 1", name)
    return w.to(torch.float32)


def masked_bce(logits, targets, mask, pos_weight, reduction="mean"):
    """Class-weighted binary cross-entropy over unmasked entries.

    ``reduction="sum"`` returns ``(sum of losses, number of entries)``.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pos_weight, reduction="none")
    m = mask.to(loss.dtype)
    total, count = (loss * m).sum(), m.sum()
    if reduction == "sum":
        return total, count
    return total / count.clamp_min(1.0)


def describe_training_data(df):
    """Counts that describe the training images (plain dict), for the model card and Table 1."""
    out = {"images": int(len(df))}
    patients = df["Path"].astype(str).str.extract(r"(patient\d+)", expand=False)
    if patients.notna().all():
        out["patients"] = int(patients.nunique())
    for col, key in (("Frontal/Lateral", "views"), ("AP/PA", "projections"), ("Sex", "sex")):
        if col in df.columns:
            out[key] = {str(k): int(v) for k, v in df[col].fillna("blank").value_counts().sort_index().items()}
    if "Age" in df.columns:
        age = pd.to_numeric(df["Age"], errors="coerce").dropna()
        if len(age):
            out["age"] = {"n": int(len(age)), "mean": float(age.mean()),
                          "sd": float(age.std(ddof=1)) if len(age) > 1 else float("nan")}
    return out


class CheXpertImages(Dataset):
    """Images of a CheXpert split as network inputs, with targets and masks."""

    def __init__(self, files, targets, mask, preprocessing):
        self.files = list(files)
        self.targets = targets
        self.mask = mask
        self.preprocessing = preprocessing

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from covreport.images import load_image, to_tensor

        x = to_tensor(load_image(self.files[i]), self.preprocessing)
        return x, self.targets[i], self.mask[i], i


# --- initial weights ------------------------------------------------------------


def _imagenet_cache_path():
    from urllib.parse import urlparse

    from torchvision.models import DenseNet121_Weights

    url = DenseNet121_Weights.IMAGENET1K_V1.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def initial_model(config):
    """The DenseNet121 to start training from, per ``config.init``.

    ``"imagenet"`` uses torchvision's ImageNet weights from the torch hub
    cache; covreport never downloads anything, so when the file is not cached
    this fails with a :class:`ModelError` saying where to put it. A file is a
    covreport checkpoint or a DenseNet121 state dict: its convolutional trunk
    is loaded; its classifier too when the labels match.
    """
    labels = config.labels
    init = config.init
    if init == "none":
        return build_model(labels)
    if init == "imagenet":
        import torchvision

        url, cached = _imagenet_cache_path()
        if not cached.is_file():
            raise ModelError(
                f"ImageNet weights for DenseNet121 are not cached at {cached}, and covreport does not "
                f"download at run time. Download {url} on a machine with internet and put it at "
                f"{cached} (TORCH_HOME sets the folder), or use --init none or --init FILE.")
        from torchvision.models import DenseNet121_Weights

        # The file is cached, so torchvision reads it (and checks its hash) without the network.
        net = torchvision.models.densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1, progress=False)
        net.classifier = torch.nn.Linear(net.classifier.in_features, len(labels))
        return net
    return _model_from_file(Path(init).expanduser(), labels)


def _model_from_file(path, labels):
    from covreport.model import _safe_torch_load

    if not path.is_file():
        raise ModelError(f"--init {path}: file not found; use imagenet, none or an existing checkpoint.")
    try:
        payload = read_training_state(path)
        state, file_labels = payload["state_dict"], tuple(payload["labels"])
    except ModelError:
        try:
            state = _safe_torch_load(path)
        except Exception:
            raise ModelError(f"--init {path} is neither a covreport checkpoint nor a DenseNet121 state dict "
                             "loadable with torch.load(weights_only=True).") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"--init {path} is neither a covreport checkpoint nor a DenseNet121 state dict.")
        file_labels = None
    model = build_model(labels)
    trunk = {k: v for k, v in state.items() if k.startswith("features.")}
    try:
        model.load_state_dict(trunk, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"--init {path} does not fit a DenseNet121: {str(exc).splitlines()[0]}") from None
    missing = sorted(set(k for k in model.state_dict() if k.startswith("features.")) - set(trunk))
    if missing:
        raise ModelError(f"--init {path} lacks DenseNet121 weights such as {missing[0]!r}.")
    w, b = state.get("classifier.weight"), state.get("classifier.bias")
    if (w is not None and b is not None and tuple(w.shape) == tuple(model.classifier.weight.shape)
            and (file_labels is None or file_labels == tuple(labels))):
        model.classifier.load_state_dict({"weight": w, "bias": b})
    else:
        logger.info("--init %s: classifier not reused (labels or shape differ); it starts random", path)
    return model


# --- distributed helpers ----------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0


def _dist_setup(use_cuda):
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        here = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, initialised_here=here)


def _barrier(d):
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def _all_sum(d, values, device):
    """Sum a list of floats over processes."""
    if not d.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- training ---------------------------------------------------------------------


def epoch_checkpoint_path(out, epoch):
    """``DIR/NAME.epoch<N>.pt`` beside ``out`` (``epoch`` 1-based)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.epoch{epoch}{out.suffix or '.pt'}")


def _epoch_checkpoints(out):
    """``[(epoch, path)]`` of the ``NAME.epoch<N>.pt`` files beside ``out``."""
    out = Path(out)
    pattern = re.compile(re.escape(out.stem) + r"\.epoch(\d+)" + re.escape(out.suffix or ".pt") + "$")
    found = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return found


def _last_epoch_checkpoint(out):
    found = _epoch_checkpoints(out)
    return max(found) if found else (0, None)


def _delete_epoch_checkpoints(out):
    for _, path in _epoch_checkpoints(out):
        path.unlink(missing_ok=True)


#: Options that must match to resume a run (epochs may grow).
_RESUME_KEYS = ("labels", "uncertainty", "image_size", "batch_size", "lr", "betas", "init", "seed", "max_images")


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _evaluate(model, loader, pos_weight, device, use_cuda, n_labels):
    """Validation loss (mean over unmasked entries) and probabilities in dataset order."""
    net = _unwrap(model)
    net.eval()
    probs = torch.full((len(loader.dataset), n_labels), float("nan"))
    total, count = 0.0, 0.0
    with torch.inference_mode():
        for x, y, m, idx in loader:
            x = x.to(device, non_blocking=True)
            if use_cuda:
                x = x.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
                logits = net(x)
            logits = logits.float().cpu()
            s, c = masked_bce(logits, y, m, pos_weight, reduction="sum")
            total += float(s)
            count += float(c)
            probs[idx] = torch.sigmoid(logits)
    return total / max(count, 1.0), probs


class TrainingEta:
    """The time training still needs, estimated from its measured speed (said on stderr).

    After the first :attr:`MEASURE` batches of this run (the first batch,
    which warms up, is not counted) and after each epoch, says the measured
    seconds per batch and the time left, so that the estimate holds on a
    busy machine as on an idle one.
    """

    MEASURE = 5

    def __init__(self, batches_per_epoch, start_epoch, epochs, valid_fraction, *, enabled=True):
        self.per_epoch, self.start, self.epochs = batches_per_epoch, start_epoch, epochs
        self.valid_fraction, self.enabled = valid_fraction, enabled
        self.done = 0
        self.t_first = self.t_epoch = None
        self.epoch_seconds = []

    def epoch_start(self, epoch):
        self.t_epoch = time.perf_counter()

    def _left(self, seconds_per_batch, batches_left, epochs_left):
        # validation: a forward pass over the validation set, about a third of a training step per image
        return seconds_per_batch * (batches_left + epochs_left * self.per_epoch * self.valid_fraction / 3)

    def batch_done(self):
        self.done += 1
        if self.done == 1:
            self.t_first = time.perf_counter()
        elif self.done == self.MEASURE + 1 and self.enabled:
            per = (time.perf_counter() - self.t_first) / self.MEASURE
            total = self.per_epoch * (self.epochs - self.start)
            left = self._left(per, total - self.done, self.epochs - self.start)
            _progress.say(f"Training speed: {per:.2f} s per batch over batches 2-{self.MEASURE + 1}; about "
                          f"{_words(left)} left ({total:,} batches in {self.epochs - self.start} epoch(s))")

    def epoch_done(self, epoch):
        self.epoch_seconds.append(time.perf_counter() - self.t_epoch)
        left_epochs = self.epochs - epoch - 1
        if self.enabled and left_epochs > 0:
            per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
            _progress.say(f"Epoch {epoch + 1} of {self.epochs} took {_words(self.epoch_seconds[-1])}; about "
                          f"{_words(per_epoch * left_epochs)} left")


def _words(seconds):
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} minutes"


def train(chexpert_root, out, config=None, *, progress=True, resume=False, keep_epochs=False):
    """Train a DenseNet121 on a CheXpert-layout folder; return the kept checkpoint's path.

    Parameters
    ----------
    chexpert_root : str or Path
        Folder holding ``train.csv`` and ``valid.csv`` (CheXpert-v1.0 or
        CheXpert-v1.0-small layout).
    out : str or Path
        The checkpoint to keep (lowest validation loss). Epoch checkpoints
        and validation CSVs are written beside it.
    config : TrainConfig, optional
        Defaults to the study's recipe.
    progress : bool
        Show a tqdm bar (loss, images/s) on stderr (rank 0 only).
    resume : bool
        Continue from the last ``NAME.epoch<N>.pt`` beside ``out`` with its
        optimizer state; starts afresh (logged) when there is none.
    keep_epochs : bool
        Keep every ``NAME.epoch<N>.pt`` (with its optimizer state, about
        three times the kept checkpoint's size) once the run completes, e.g.
        to ``resume`` later with more epochs. By default they are deleted at
        the end and only ``out`` stays; an interrupted run keeps them.

    Returns
    -------
    Path
        ``out``.
    """
    from tqdm.auto import tqdm

    from covreport.images import Preprocessing
    from covreport.stats.auc import validation_auc

    config = TrainConfig() if config is None else config
    out = Path(out)
    if out.suffix not in (".pt", ".pth"):
        raise ModelError(f"--out {out}: the checkpoint name must end in .pt or .pth.")
    want_cuda = config.device is None or str(config.device).startswith("cuda")
    use_cuda = want_cuda and torch.cuda.is_available()
    if config.device is not None and str(config.device).startswith("cuda") and not use_cuda:
        raise ModelError(f"device {config.device!r} requested but CUDA is not available.")
    d = _dist_setup(use_cuda)
    try:
        if use_cuda:
            device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        labels = list(config.labels)
        root = Path(chexpert_root)
        train_df = read_chexpert_split(root, "train", labels)
        valid_df = read_chexpert_split(root, "valid", labels)
        train_sha = sha256_file(root / "train.csv")
        valid_sha = sha256_file(root / "valid.csv")
        if config.max_images is not None:
            if len(train_df) > config.max_images:
                train_df = train_df.sample(n=config.max_images, random_state=config.seed).sort_index()
            if len(valid_df) > config.max_images:
                valid_df = valid_df.sample(n=config.max_images, random_state=config.seed).sort_index()
        train_df = train_df.reset_index(drop=True)
        valid_df = valid_df.reset_index(drop=True)
        y_train, m_train = label_targets(train_df, labels, config.uncertainty, source=str(root / "train.csv"))
        y_valid, m_valid = label_targets(valid_df, labels, config.uncertainty, source=str(root / "valid.csv"))
        pos_weight = pos_weights(y_train, m_train, labels)
        preprocessing = Preprocessing(size=config.image_size)

        _seed_everything(config.seed)
        model = initial_model(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
        start_epoch, history, best = 0, [], {"val_loss": math.inf, "epoch": 0}
        if resume:
            last, path = _last_epoch_checkpoint(out)
            if path is None:
                logger.info("--resume: no epoch checkpoint beside %s; starting afresh", out)
            else:
                payload = read_training_state(path)
                state = payload.get("training_state")
                if not isinstance(state, dict) or "optimizer" not in state:
                    raise ModelError(f"--resume: {path} has no optimizer state; it is not an epoch checkpoint.")
                before = payload.get("metadata", {}).get("training", {})
                now = config.to_dict()
                diff = [k for k in _RESUME_KEYS if k in before and _norm(before[k]) != _norm(now[k])]
                if diff:
                    raise ModelError(
                        f"--resume: {path} was trained with different options "
                        + ", ".join(f"{k}={before[k]!r} (now {now[k]!r})" for k in diff)
                        + "; rerun with the same options, or without --resume to start afresh."
                    )
                model.load_state_dict(payload["state_dict"])
                optimizer.load_state_dict(state["optimizer"])
                start_epoch = int(state["epoch"])
                history = list(state.get("history", []))
                best = dict(state.get("best", best))
                logger.info("resuming after epoch %d from %s", start_epoch, path)
        model.to(device)
        if use_cuda:
            model.to(memory_format=torch.channels_last)
        # optimizer state follows its parameters' device
        for st in optimizer.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(device)
        net = model
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[d.local_rank] if use_cuda else None)

        train_set = CheXpertImages(train_df["_file"], y_train, m_train, preprocessing)
        valid_set = CheXpertImages(valid_df["_file"], y_valid, m_valid, preprocessing)
        if use_cuda:
            workers = config.num_workers if config.num_workers is not None else min(4, _threads.available_cpus())
        else:
            # threads + worker processes never outnumber the cores; threads wait without spinning
            workers = _threads.cpu_workers(config.num_workers)
            threads = _threads.configure_torch(workers, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            logger.info("training on the CPU with %d thread(s) and %d DataLoader worker(s)", threads, workers)
        loader_kw = {"num_workers": workers, "pin_memory": use_cuda, "persistent_workers": False}
        valid_loader = DataLoader(valid_set, batch_size=config.batch_size, shuffle=False, **loader_kw)
        pw_device = pos_weight.to(device)
        eta = TrainingEta(len(train_set) // (config.batch_size * d.world) + 1, start_epoch, config.epochs,
                          len(valid_set) / max(len(train_set), 1), enabled=d.main)
        meta_base = {
            "training": config.to_dict(),
            "recipe": "Duchesne, Gourdeau et al. 2020 (CheXpert DenseNet121)",
            "loss": LOSS_DESCRIPTION,
            "optimizer": f"Adam, fixed lr {config.lr:g}, betas {config.betas[0]:g}/{config.betas[1]:g}",
            "selection": "epoch with the lowest validation loss",
            "pos_weight": dict(zip(labels, pos_weight.tolist())),
            "train_csv_sha256": train_sha,
            "valid_csv_sha256": valid_sha,
            "train_csv": {"path": str(root / "train.csv"), "sha256": train_sha, "rows_used": len(train_df)},
            "valid_csv": {"path": str(root / "valid.csv"), "sha256": valid_sha, "rows_used": len(valid_df)},
            "training_data": describe_training_data(train_df),
            "world_size": d.world,
            "device": device.type,
            "precision": "bf16 autocast, channels_last" if use_cuda else "float32",
        }

        for epoch in range(start_epoch, config.epochs):
            if d.enabled:
                from torch.utils.data.distributed import DistributedSampler

                sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank,
                                             shuffle=True, seed=config.seed)
                sampler.set_epoch(epoch)
                loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, **loader_kw)
            else:
                gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
                loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                                    generator=gen, **loader_kw)
            net.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                       disable=not (progress and d.main) or _progress.is_quiet(), leave=True,
                       dynamic_ncols=True)
            t0, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0.0
            eta.epoch_start(epoch)
            for x, y, m, _ in bar:
                x = x.to(device, non_blocking=True)
                if use_cuda:
                    x = x.to(memory_format=torch.channels_last)
                y, m = y.to(device, non_blocking=True), m.to(device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
                    logits = net(x)
                loss = masked_bce(logits, y, m, pw_device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += x.shape[0]
                count = float(m.sum())
                loss_sum += float(loss.detach()) * count
                loss_n += count
                rate = seen * d.world / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss_sum / max(loss_n, 1):.4f}", img_s=f"{rate:.1f}")
                eta.batch_done()
            bar.close()
            loss_sum, loss_n = _all_sum(d, [loss_sum, loss_n], device)
            train_loss = loss_sum / max(loss_n, 1.0)

            if d.main:
                val_loss, probs = _evaluate(model, valid_loader, pos_weight, device, use_cuda, len(labels))
                scores = pd.DataFrame(probs.numpy(), columns=labels)
                truth = valid_df[labels].apply(pd.to_numeric, errors="coerce")
                auc = validation_auc(truth, scores, labels)
                history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
                improved = val_loss < best["val_loss"]
                if improved:
                    best = {"val_loss": val_loss, "epoch": epoch + 1}
                meta = dict(meta_base, epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss,
                            validation_auc=auc, history=history, best_epoch=best["epoch"],
                            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                save_checkpoint(epoch_checkpoint_path(out, epoch + 1), model, labels=labels,
                                preprocessing=preprocessing, metadata=meta,
                                training_state={"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                                                "history": history, "best": best})
                if improved:
                    save_checkpoint(out, model, labels=labels, preprocessing=preprocessing, metadata=meta)
                    write_csv_atomic(auc, _sidecar(out, "validation_auc"))
                    val_scores = pd.concat([valid_df[["Path"]].rename(columns={"Path": "image"}), scores], axis=1)
                    write_csv_atomic(val_scores, _sidecar(out, "validation_scores"))
                logger.info("epoch %d: train loss %.4f, validation loss %.4f%s", epoch + 1, train_loss,
                            val_loss, " (kept)" if improved else "")
            _barrier(d)
            model.train()
            eta.epoch_done(epoch)

        if d.main and best["epoch"]:
            # the kept checkpoint gets the whole run's history (and is restored if a
            # kill fell between an epoch checkpoint and the kept copy)
            _finalise_kept(out, best["epoch"], history, config.epochs)
            if not keep_epochs:
                _delete_epoch_checkpoints(out)
        _barrier(d)
        return out
    finally:
        if d.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _norm(value):
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def _sidecar(out, what):
    out = Path(out)
    return out.with_name(f"{out.stem}.{what}.csv")


def _finalise_kept(out, epoch, history, epochs):
    """Rewrite the kept checkpoint from its epoch file, with the whole run's history."""
    payload = read_training_state(epoch_checkpoint_path(out, epoch))
    payload.pop("training_state", None)
    meta = dict(payload.get("metadata") or {})
    meta.update(history=list(history), epochs_run=len(history), epochs_planned=epochs)
    payload["metadata"] = _plain(meta)
    _atomic_torch_save(payload, out)


__all__ = [
    "TrainConfig", "UNCERTAINTY_POLICIES", "label_targets", "pos_weights",
    "masked_bce", "read_chexpert_split", "initial_model", "train", "epoch_checkpoint_path",
]
