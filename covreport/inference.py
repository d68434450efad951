"""Run the network on batches of images: decoding workers, BatchNorm folding, precision, forward.

Speed on a CPU: DataLoader worker processes each decode and score whole
batches with their share of the cores (data parallelism across processes:
no thread barriers, so it also holds up on a machine shared with other
jobs); the network is an inference copy with each BatchNorm that directly
follows a convolution folded into it, run under :func:`torch.inference_mode`
in the ``channels_last`` memory layout (oneDNN's fast path), in float32 by
default or with the trunk cast to bfloat16 when asked (``precision="bf16"``). On a
GPU the workers only decode and the main process runs the network.
bf16 accuracy (``benchmarks/bench_score.py``, 64 synthetic 320-px images,
randomly initialised DenseNet121, AVX512-BF16 CPU): the pooled features
differ from float32 by at most 0.5% in relative norm; probabilities by at
most 0.002 with the random classifier, and by at most 0.018 under a random
classifier scaled to trained-like logits (|logit| ~ 4) with every bias at
the sigmoid's steepest point. The classifier itself runs in float32. No
trained CheXpert weights were available to measure on; rerun the benchmark
with real weights before relying on bf16 near a decision threshold.

Torchrun sharding of the images is :mod:`covreport.distributed`; scoring
through the cache is :mod:`covreport.scoring`.
"""

import copy
import hashlib
import warnings

import numpy as np

from covreport.errors import ImageError, ModelError

PRECISIONS = ("float32", "bf16")
_PRECISION_ALIASES = {"float32": "float32", "fp32": "float32", "bf16": "bf16", "bfloat16": "bf16"}


# --------------------------------------------------------------------------
# Decoding in worker processes
# --------------------------------------------------------------------------


class _BatchDataset:
    """Item ``b`` is batch ``b``: its images decoded and, on a CPU, scored.

    On a CPU each DataLoader worker process runs the whole batch, decoding
    and network, with its share of the cores (data parallelism across
    processes, which keeps both cores busy better than one process with two
    intra-op threads). For a GPU the workers only decode and the main
    process runs the network.

    Returns ``(b, indices, x, probs, feats, bad)``: ``x`` the stacked input
    when the network is to run in the main process, else None; ``probs`` and
    ``feats`` the outputs when it ran here; ``bad`` a list of
    ``(index, reason)`` for images that could not be read. Never raises on a
    bad image.
    """

    def __init__(self, items, preprocessing, batch_size, model=None, device=None,
                 precision="float32"):
        self.items = items  # list of (path, expected sha256)
        self.preprocessing = preprocessing
        self.batches = [list(range(i, min(i + batch_size, len(items))))
                        for i in range(0, len(items), batch_size)]
        self.model = model  # None: return inputs, the caller runs the network
        self.device = device
        self.precision = precision

    def __len__(self):
        return len(self.batches)

    def _decode(self, i):
        from covreport.images import decode_image, read_image_bytes, to_tensor

        path, expected = self.items[i]
        try:
            data = read_image_bytes(path)
            if hashlib.sha256(data).hexdigest() != expected:
                return None, "file changed while scoring"
            return to_tensor(decode_image(data, name=str(path)), self.preprocessing), None
        except ImageError as exc:
            return None, getattr(exc, "reason", str(exc))

    def __getitem__(self, b):
        import torch

        indices, tensors, bad = [], [], []
        for i in self.batches[b]:
            t, reason = self._decode(i)
            if t is None:
                bad.append((i, reason))
            else:
                indices.append(i)
                tensors.append(t)
        x = torch.stack(tensors) if tensors else None
        if x is not None and self.model is not None:
            probs, feats = _forward(self.model, x, self.device, self.precision)
            return b, indices, None, probs, feats, bad
        return b, indices, x, None, None, bad


def _identity(item):
    return item


def _worker_init(threads, _worker_id):
    import torch

    torch.set_num_threads(threads)


def _batches(dataset, num_workers, pin_memory):
    """Yield the dataset's batches in order, computed in ``num_workers`` processes.

    If worker processes cannot start or die (no /dev/shm in a container,
    a sandbox that forbids fork), the remaining batches are computed in this
    process instead, with a warning.
    """
    import functools

    import torch
    import torch.utils.data as tud

    done = set()
    # Each worker pays a fork and its own warm-up (oneDNN kernel creation):
    # worth it only if every worker gets at least two batches.
    from covreport._threads import available_cpus

    wanted = min(max(0, int(num_workers)), available_cpus())  # never more processes than cores
    workers = min(wanted, len(dataset) // 2)
    if workers < min(wanted, 2):
        workers = 0
    while True:
        remaining = [b for b in range(len(dataset)) if b not in done]
        if not remaining:
            return
        threads = max(1, torch.get_num_threads() // workers) if workers else None
        loader = tud.DataLoader(
            tud.Subset(dataset, remaining), batch_size=None, shuffle=False,
            num_workers=workers, collate_fn=_identity, pin_memory=pin_memory,
            worker_init_fn=functools.partial(_worker_init, threads) if workers else None,
        )
        try:
            for item in loader:
                done.add(item[0])
                yield item
            return
        except (RuntimeError, OSError) as exc:
            if workers == 0:
                raise
            warnings.warn(
                f"scoring worker processes failed ({type(exc).__name__}: {exc}); "
                f"decoding and scoring the remaining images in the main process",
                RuntimeWarning, stacklevel=2,
            )
            workers = 0


# --------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------


def _normalise_precision(precision):
    key = str(precision).lower()
    if key not in _PRECISION_ALIASES:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _PRECISION_ALIASES[key]


def _device_of(model):
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _bf16_supported(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch.backends, "cpu", None)
        capability = cpu.get_cpu_capability() if cpu is not None else ""
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return bool(amx or avx512_bf16 or capability == "AVX512_BF16")
    return True


def _prepare_model(loaded, device=None, precision="float32"):
    """An inference copy of the network: BatchNorm folded, channels_last, on ``device``.

    With ``precision="bf16"`` the convolutional trunk's weights are cast to
    bfloat16 once here, rather than by autocast in every batch (the same
    arithmetic, 1.12x faster on this CPU); the classifier stays float32.

    The copy shares the caller's tensors where they are used unchanged (no
    deep copy of DenseNet121's weights) and leaves the caller's model as it
    was. Folding a BatchNorm into the convolution before it (eval mode:
    ``y = scale * conv(x) + shift``) removes one pass over the activations
    and gives the same outputs up to float rounding.
    """
    import itertools

    import torch
    from torch import nn

    src = loaded.model
    memo = {id(t): t for t in itertools.chain(src.parameters(), src.buffers())}
    model = copy.deepcopy(src, memo).eval()  # new modules, shared tensors
    _fold_batchnorms(model)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            t = p.detach()
            if device is not None:
                t = t.to(device)
            if t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            module._parameters[name] = nn.Parameter(t, requires_grad=False)
        if device is not None:
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    if precision == "bf16":
        model.features.to(torch.bfloat16)
    return model


def _fold(conv, bn):
    """A Conv2d computing ``bn(conv(x))`` in eval mode, or None if not foldable."""
    import torch
    from torch import nn

    if not (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d
            and bn.running_mean is not None and bn.running_var is not None):
        return None
    with torch.no_grad():
        scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded


def _fold_batchnorms(model):
    """Fold BatchNorm2d into the Conv2d before it, where the order is known.

    In plain ``nn.Sequential`` containers (a Conv2d directly followed by a
    BatchNorm2d, e.g. DenseNet's ``conv0``/``norm0``) and in torchvision's
    DenseNet layers (``conv1`` is followed by ``norm2`` in their forward).
    """
    from torch import nn

    try:
        from torchvision.models.densenet import _DenseLayer
    except ImportError:  # pragma: no cover
        _DenseLayer = ()
    for module in list(model.modules()):
        if type(module) is nn.Sequential:
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                folded = _fold(module._modules[a], module._modules[b])
                if folded is not None:
                    module._modules[a] = folded
                    module._modules[b] = nn.Identity()
        elif _DenseLayer and isinstance(module, _DenseLayer):
            folded = _fold(module.conv1, module.norm2)
            if folded is not None:
                module.conv1 = folded
                module.norm2 = nn.Identity()


def output_problem(probs, feats):
    """Why one image's network output cannot be a score (a short reason), or ``None``.

    Every probability must be finite and in ``[0, 1]`` and every pooled
    feature finite: weights that overflow (or an input that makes them)
    give NaN or infinity, which must become an exclusion with this reason,
    never an empty probability.
    """
    p, f = np.asarray(probs, dtype=np.float64), np.asarray(feats, dtype=np.float64)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(f))):
        return ("network output not finite (NaN or infinity) for this image: the weights overflow on it; "
                "check or retrain the checkpoint")
    if np.any(p < 0) or np.any(p > 1):
        return "network output outside [0, 1] for this image: check the checkpoint"
    return None


def _forward(model, x, device, precision):
    """Probabilities and pooled features of a batch; with ``precision="bf16"`` the model's trunk is the
    bfloat16 one of :func:`_prepare_model`."""
    import torch

    from covreport.model import features_and_logits, pooled_features

    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if precision == "float32":
            feats, logits = features_and_logits(model, x)
        else:
            # The 1024 -> L classifier is cheap: run it in float32 on the
            # features, so only the convolutional trunk's rounding remains.
            feats = pooled_features(model, x.to(torch.bfloat16)).float()
            logits = model.classifier(feats)
        probs = torch.sigmoid(logits.float())
    return (probs.cpu().numpy().astype(np.float32, copy=False),
            feats.cpu().numpy().astype(np.float32, copy=False))
