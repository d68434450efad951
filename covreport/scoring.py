"""Score images with the model, through the cache, and read/write scores files.

A scores table has one row per image: ``image`` (the key the caller gave,
e.g. the path exactly as the manifest writes it), one probability column per
label (``sigmoid(logit)``), and ``feat_0000`` ... ``feat_1023``, the globally
average-pooled output of the last convolutional block.

Speed on a CPU: DataLoader worker processes each decode and score whole
batches with their share of the cores (data parallelism across processes:
no thread barriers, so it also holds up on a machine shared with other
jobs); the network is an inference copy with each BatchNorm that directly
follows a convolution folded into it, run under :func:`torch.inference_mode`
in the ``channels_last`` memory layout (oneDNN's fast path), in float32 by
default or under bfloat16 autocast when asked (``precision="bf16"``). On a
GPU the workers only decode and the main process runs the network.
Each distinct image (by content SHA-256) is run once, and not at all when the
cache already holds its output for these weights and preprocessing.

bf16 accuracy (``benchmarks/bench_score.py``, 64 synthetic 320-px images,
randomly initialised DenseNet121, AVX512-BF16 CPU): the pooled features
differ from float32 by at most 0.5% in relative norm; probabilities by at
most 0.002 with the random classifier, and by at most 0.018 under a random
classifier scaled to trained-like logits (|logit| ~ 4) with every bias at
the sigmoid's steepest point. The classifier itself runs in float32. No
trained CheXpert weights were available to measure on; rerun the benchmark
with real weights before relying on bf16 near a decision threshold.
"""

import copy
import dataclasses
import hashlib
import io
import time
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from covreport import progress as _progress
from covreport.constants import FEATURE_PREFIX, IMAGE_COLUMN, MANIFEST_COLUMNS, N_FEATURES, feature_columns
from covreport.errors import ImageError, ModelError, ScoresError

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bf16")
_PRECISION_ALIASES = {"float32": "float32", "fp32": "float32", "bf16": "bf16", "bfloat16": "bf16"}
SCORES_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclasses.dataclass
class ScoringResult:
    """What :func:`score_images` returns.

    Attributes
    ----------
    scores : pandas.DataFrame
        ``image``, one column per label (float64 holding the float32
        probabilities exactly), ``feat_0000``... (float32); one row per
        image key that was scored, in the order given.
    failed : dict
        Image key -> short reason, for images that could not be read
        (they become exclusions, not an exception).
    labels : tuple of str
    scored : int
        Distinct images (by content) run through the network in this call.
    from_cache : int
        Distinct images whose output came from the cache.
    cache_rows_rejected : int
        Cached rows found for these images but not used (damaged: wrong
        shape, non-finite, probabilities outside [0, 1], other labels); those
        images were scored again.
    weights_sha256 : str
    preprocessing : dict
    precision : str
    """

    scores: pd.DataFrame
    failed: dict
    labels: tuple
    scored: int
    from_cache: int
    weights_sha256: str = ""
    preprocessing: dict = dataclasses.field(default_factory=dict)
    precision: str = "float32"
    cache_rows_rejected: int = 0

    @property
    def images(self):
        """Number of image keys with a score."""
        return len(self.scores)

    def metadata(self):
        """Plain provenance for a scores file's sidecar (no image contents)."""
        from covreport import __version__

        return {
            "covreport_version": __version__,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
            "precision": self.precision,
            "labels": list(self.labels),
            "images_scored": int(self.scored),
            "images_from_cache": int(self.from_cache),
            "cache_rows_rejected": int(self.cache_rows_rejected),
            "images_failed": len(self.failed),
            "failed": {str(k): v for k, v in self.failed.items()},
        }


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


def _prepare_model(loaded, device=None):
    """An inference copy of the network: BatchNorm folded, channels_last, on ``device``.

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


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


def _as_mapping(images):
    if isinstance(images, dict):
        return {str(k): Path(v) for k, v in images.items()}
    out = {}
    for p in images:
        out.setdefault(str(p), Path(p))
    return out


def _hash(path):
    """SHA-256 of an image file, or the ImageError: magic bytes and size checked first, then hashed
    in chunks (:func:`covreport.images.image_sha256`), never read whole."""
    from covreport.images import image_sha256

    try:
        return image_sha256(path)
    except ImageError as exc:
        return exc


def _hash_all(paths):
    """SHA-256 of each file (or the ImageError), reading in a few threads.

    File reads and hashlib release the GIL, so threads overlap I/O and
    hashing; this is most of the cost of a rerun that finds everything cached.
    """
    if len(paths) < 64:
        return [_hash(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(_hash, paths))


def score_images(images, loaded, *, cache=None, batch_size=16, num_workers=2,
                 precision="float32", progress=False, device=None, what="images", shards=None):
    """Score images once each, through the cache.

    Parameters
    ----------
    images : sequence of path, or dict key -> path
        With a sequence the key is ``str(path)``; with a dict the key (for
        example the path as a manifest writes it) names the row and the value
        is the file to read. Repeated keys are scored once; different keys
        whose files have the same bytes share one network run.
    loaded : covreport.model.LoadedModel
        The network, its labels, preprocessing and weights SHA-256 (its
        model is not modified: scoring runs on an inference copy).
    cache : covreport.cache.ScoreCache or None
        Outputs found there are not recomputed; new outputs are added after
        each batch (one transaction each), so an interrupted run resumes.
    batch_size : int
    num_workers : int
        DataLoader worker processes. On a CPU each decodes and scores whole
        batches with ``torch.get_num_threads() // num_workers`` threads; on a
        GPU they only decode. 0 does everything in this process.
    precision : {"float32", "bf16"}
        bf16 runs the network under ``torch.autocast(dtype=torch.bfloat16)``;
        probabilities and features are returned as float32 either way. bf16
        outputs are cached under their own key (the preprocessing signature
        plus ``+bf16``), so float32 and bf16 runs never mix.
    progress : bool
        Show a tqdm progress bar on stderr.
    device : str or torch.device, optional
        Where to run; default where the model's parameters are.
    what : str
        What the images are, in the stage message ("Scoring 300 validation images ...").
    shards : covreport.distributed.Shards, optional
        Under torchrun (:func:`score_manifest` passes it): rank 0's cache
        decides what is left to score, each rank scores its share and rank 0
        takes the other ranks' shard files into the cache. Every rank calls
        this with the same images; only rank 0's result holds every score,
        another rank's holds its share. Rows that ranks of an interrupted
        torchrun left beside ``cache`` are taken with or without it.

    Returns
    -------
    ScoringResult
    """
    import torch

    from covreport.cache import CacheKey

    precision = _normalise_precision(precision)
    if int(batch_size) < 1:
        raise ModelError(f"batch size must be at least 1, got {batch_size}")
    labels = tuple(loaded.labels)
    prep = loaded.preprocessing
    # bf16 outputs differ from float32 ones in the last digits: they get their
    # own cache entries, so a float32 run never returns bf16 numbers.
    signature = prep.signature() + ("" if precision == "float32" else f"+{precision}")
    mapping = _as_mapping(images)

    failed = {}
    sha_of = {}
    for key, digest in zip(mapping, _hash_all(list(mapping.values()))):
        if isinstance(digest, ImageError):
            failed[key] = getattr(digest, "reason", str(digest))
        else:
            sha_of[key] = digest
    distinct = list(dict.fromkeys(sha_of.values()))
    path_of_sha = {}
    for key, sha in sha_of.items():
        path_of_sha.setdefault(sha, mapping[key])

    outputs = {}  # sha -> (probs float32 (L,), feats float32 (F,))
    rejected = 0
    if cache is not None and distinct:
        from covreport.cache import row_problem

        keys = [CacheKey(s, loaded.sha256, signature) for s in distinct]
        before = cache.rows_rejected
        found = cache.get_many(keys)
        rejected = cache.rows_rejected - before
        for k, v in found.items():
            problem = row_problem(v, labels, N_FEATURES)
            if problem is None:
                outputs[k.image_sha256] = (v.probabilities, v.features)
            else:  # a damaged or edited row: a miss, scored again (and its row replaced)
                rejected += 1
                log.warning("score cache %s: row for image %s not used (%s); scoring it again",
                            cache.path, k.image_sha256, problem)
    todo = [s for s in distinct if s not in outputs]
    if cache is not None and todo:  # rows that ranks of an interrupted torchrun left in shard files
        from covreport.distributed import take_leftover_shards

        outputs.update(take_leftover_shards(cache, todo, loaded.sha256, signature, labels))
        todo = [s for s in todo if s not in outputs]
    from_cache = len(outputs)
    planned, sink = todo, cache
    if shards is not None:  # under torchrun: this rank scores its share (covreport/distributed.py)
        todo = shards.share(distinct, todo)
        sink = shards.sink(cache, loaded.sha256, signature)
        planned = planned if shards.is_main else todo
    bad_sha = {}

    # stage message by hand (not `with progress.stage`) to keep the block below as it is
    noun = what[:-1] if len(distinct) == 1 and what.endswith("s") else what
    stage = f"Scoring {len(distinct)} {noun} ({from_cache} from the cache)"
    if shards is not None:
        stage = (f"{stage}, {len(todo)} of them on rank 0 of {shards.world_size}" if shards.is_main
                 else f"Rank {shards.rank} of {shards.world_size}: scoring {len(todo)} "
                      f"{what[:-1] if len(todo) == 1 and what.endswith('s') else what}")
    _progress.say(f"{stage} ...")
    started = time.perf_counter()
    if todo:
        run_device = torch.device(device) if device is not None else _device_of(loaded.model)
        if precision == "bf16" and not _bf16_supported(run_device):
            warnings.warn(
                f"bfloat16 is not natively supported on this {run_device.type}; "
                "bf16 scoring will be emulated and may be slower than float32",
                RuntimeWarning, stacklevel=2,
            )
        model = _prepare_model(loaded, run_device)
        on_cpu = run_device.type == "cpu"
        dataset = _BatchDataset([(path_of_sha[s], s) for s in todo], prep, int(batch_size),
                                model=model if on_cpu else None, device=run_device,
                                precision=precision)
        bar = None
        if progress:
            bar = _progress.bar(total=len(todo), unit="img", desc="scoring")
        try:
            for _, indices, x, probs, feats, bad in _batches(dataset, num_workers,
                                                             pin_memory=not on_cpu):
                for i, reason in bad:
                    bad_sha[todo[i]] = reason
                if x is not None:
                    probs, feats = _forward(model, x, run_device, precision)
                if indices:
                    rows = []
                    for j, i in enumerate(indices):
                        problem = output_problem(probs[j], feats[j])
                        if problem is not None:  # an exclusion with its reason, never an empty score
                            bad_sha[todo[i]] = problem
                            continue
                        outputs[todo[i]] = (probs[j], feats[j])
                        rows.append((CacheKey(todo[i], loaded.sha256, signature),
                                     labels, probs[j], feats[j]))
                    if sink is not None and rows:
                        sink.put_many(rows)
                if bar is not None:
                    bar.update(len(indices) + len(bad))
        finally:
            if bar is not None:
                bar.close()

    if shards is not None:  # waits for every rank; rank 0 takes their shards into the cache
        more, more_bad = shards.finish(sink, bad_sha, cache, loaded.sha256, signature, labels)
        outputs.update(more)
        bad_sha.update(more_bad)
    _progress.say(f"{stage}: done in {time.perf_counter() - started:.1f} s")
    for key, sha in sha_of.items():
        if sha in bad_sha:
            failed[key] = bad_sha[sha]
    failed = {k: failed[k] for k in mapping if k in failed}  # in the order given
    keys = [k for k in mapping if k in sha_of and sha_of[k] in outputs]
    scores = _scores_frame(keys, [outputs[sha_of[k]] for k in keys], labels)
    return ScoringResult(
        scores=scores, failed=failed, labels=labels,
        scored=len(planned) - len(bad_sha), from_cache=from_cache, cache_rows_rejected=rejected,
        weights_sha256=loaded.sha256, preprocessing=prep.to_dict(), precision=precision,
    )


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
    import contextlib

    import torch

    from covreport.model import features_and_logits

    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        feats, logits = features_and_logits(model, x)
    feats = feats.float()
    with torch.inference_mode():
        if precision != "float32":
            # The 1024 -> L classifier is cheap: run it in float32 on the
            # features, so only the convolutional trunk's rounding remains.
            logits = model.classifier(feats)
        probs = torch.sigmoid(logits.float())
    return (probs.cpu().numpy().astype(np.float32, copy=False),
            feats.cpu().numpy().astype(np.float32, copy=False))


def _scores_frame(keys, outputs, labels):
    n = len(keys)
    if n:
        probs = np.stack([o[0] for o in outputs]).astype(np.float32)
        feats = np.stack([o[1] for o in outputs]).astype(np.float32)
    else:
        probs = np.zeros((0, len(labels)), np.float32)
        feats = np.zeros((0, N_FEATURES), np.float32)
    columns = {IMAGE_COLUMN: pd.Series(keys, dtype=str)}
    for j, lab in enumerate(labels):
        columns[lab] = probs[:, j].astype(np.float64)
    frame = pd.DataFrame(columns)
    feat = pd.DataFrame(feats, columns=feature_columns(feats.shape[1]))
    return pd.concat([frame, feat], axis=1)


def score_manifest(manifest, weights, *, cache_path=None, use_cache=True, batch_size=16,
                   num_workers=2, precision="float32", progress=False, device=None):
    """Score every image a manifest names, keyed by the path as the manifest writes it.

    Parameters
    ----------
    manifest : covreport.manifest.Manifest
        From :func:`covreport.manifest.read_manifest`; its ``pairs`` table has
        ``first_image``/``second_image`` (as written) and
        ``first_path``/``second_path`` (resolved).
    weights : covreport.model.LoadedModel, or a weights spec for
        :func:`covreport.model.load_checkpoint`.
    cache_path : path, optional
        The cache database; default :func:`covreport.cache.default_cache_path`.
    use_cache : bool
        False scores everything and writes no cache.
    batch_size, num_workers, precision, progress, device
        As in :func:`score_images`.

    Returns
    -------
    ScoringResult
        ``scores["image"]`` holds the manifest's strings; ``failed`` is keyed
        by them too.

    Notes
    -----
    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: each scores
    its share of the images the cache lacks on ``cuda:LOCAL_RANK`` (else the
    CPU) and rank 0 merges the shards (:mod:`covreport.distributed`); only
    rank 0's result is the whole one. ``use_cache=False`` is refused there.
    """
    from covreport.distributed import Shards
    from covreport.model import LoadedModel, load_checkpoint

    loaded = weights if isinstance(weights, LoadedModel) else load_checkpoint(weights)
    mapping = manifest_images(manifest)
    shards = Shards.from_env(cache_path, use_cache)  # None outside torchrun
    cache = None
    try:
        if use_cache and (shards is None or shards.is_main):  # under torchrun only rank 0 opens the cache
            from covreport.cache import ScoreCache

            cache = ScoreCache(cache_path)
        return score_images(mapping, loaded, cache=cache, batch_size=batch_size,
                            num_workers=num_workers, precision=precision, progress=progress,
                            device=device if device is not None or shards is None else shards.device,
                            shards=shards)
    finally:
        if cache is not None:
            cache.close()
        if shards is not None:
            shards.close()


def score_to_file(manifest_path, out, *, weights=None, cache_path=None, use_cache=True, batch_size=16,
                  num_workers=2, precision="float32", strict=False, force=False, progress=False,
                  device=None):
    """``covreport score``: read a manifest, score its images, write the scores file and its sidecar.

    Every check that can fail is made before any image is scored: the
    output folder exists, ``out`` and ``out.json`` are no input (manifest,
    weights, cache, images) and exist only with ``force``.

    Parameters
    ----------
    manifest_path : path
        The pair manifest (see :func:`covreport.manifest.read_manifest`).
    out : path
        ``.csv`` or ``.parquet`` scores file; provenance goes to ``out.json``.
    weights : str or path, optional
        As for :func:`covreport.model.find_weights` (default: the newest
        checkpoint of the model folder).
    strict : bool
        Refuse (nothing written) when any image is missing or unreadable.
    force : bool
        Replace an existing output file (never an input).
    cache_path, use_cache, batch_size, num_workers, precision, progress, device
        As in :func:`score_manifest`.

    Returns
    -------
    (ScoringResult, covreport.model.LoadedModel)
        Under torchrun, only rank 0 writes ``out`` (see :func:`score_manifest`).
    """
    from covreport._io import check_out_file
    from covreport.cache import default_cache_path
    from covreport.manifest import read_manifest
    from covreport.model import find_weights, load_checkpoint

    out = Path(out)
    _suffix(out)
    sidecar = Path(f"{out}.json")
    spec = find_weights(weights)
    cache_file = (cache_path if cache_path is not None else default_cache_path()) if use_cache else None
    inputs = [manifest_path, spec, cache_file]
    check_out_file(out, inputs=inputs, force=force, also=[sidecar], error_class=ScoresError)
    m = read_manifest(manifest_path, strict=strict, check_images=strict)
    images = list(manifest_images(m).values())
    check_out_file(out, inputs=images, force=force, also=[sidecar], error_class=ScoresError)
    loaded = load_checkpoint(spec)
    res = score_manifest(m, loaded, cache_path=cache_path, use_cache=use_cache, batch_size=batch_size,
                         num_workers=num_workers, precision=precision, progress=progress, device=device)
    from covreport.distributed import is_main

    if not is_main():  # a torchrun rank other than 0: its share is in its shard; rank 0 writes the file
        return res, loaded
    if res.failed and res.scores.empty:
        first, reason = next(iter(res.failed.items()))
        raise ImageError(f"none of the {len(res.failed)} image(s) could be scored, e.g. {first}: {reason}; "
                         "nothing written (relative paths start at the manifest's folder)")
    if strict and res.failed:
        first, reason = next(iter(res.failed.items()))
        raise ImageError(f"{len(res.failed)} image(s) could not be scored (--strict), "
                         f"e.g. {first}: {reason}; nothing written")
    # Checked again just before writing: the folder may have changed while scoring.
    check_out_file(out, inputs=[*inputs, *images], force=force, also=[sidecar], error_class=ScoresError)
    write_scores(res.scores, out, metadata={**res.metadata(), "weights": str(loaded.source),
                                            "manifest": {"path": str(manifest_path), "sha256": m.sha256}})
    return res, loaded


def manifest_images(manifest):
    """Ordered dict: image as the manifest writes it -> resolved path.

    Pairs whose image cell is empty are skipped (the manifest reports them).
    """
    pairs = manifest.pairs if hasattr(manifest, "pairs") else manifest
    mapping = {}
    for written_col, path_col in (("first_image", "first_path"), ("second_image", "second_path")):
        if written_col not in pairs.columns:
            raise ScoresError(f"manifest pairs have no {written_col!r} column")
        resolved = pairs[path_col] if path_col in pairs.columns else pairs[written_col]
        for written, path in zip(pairs[written_col], resolved):
            if _blank(written) or _blank(path):
                continue
            mapping.setdefault(str(written), Path(str(path)))
    # First images of all pairs, then second images: keep the manifest order of
    # appearance instead (first/second interleaved per pair).
    order = []
    for a, b in zip(pairs["first_image"], pairs["second_image"]):
        for v in (a, b):
            if not _blank(v) and str(v) in mapping:
                order.append(str(v))
    return {k: mapping[k] for k in dict.fromkeys(order)}


def _blank(v):
    if v is None:
        return True
    try:
        if pd.isna(v):
            return True
    except (TypeError, ValueError):
        pass
    return isinstance(v, str) and not v.strip()


# --------------------------------------------------------------------------
# Scores files
# --------------------------------------------------------------------------


def _suffix(path):
    suffix = Path(path).suffix.lower()
    if suffix not in SCORES_SUFFIXES:
        raise ScoresError(
            f"{path}: scores file must end in .csv or .parquet, not {suffix or '(no suffix)'!r}"
        )
    return suffix


def write_scores(df, path, *, metadata=None):
    """Write a scores table atomically, as CSV or Parquet by the file's suffix.

    Parameters
    ----------
    df : pandas.DataFrame
        ``image``, label columns, ``feat_*`` columns.
    path : path
        ``.csv`` (UTF-8, formula cells neutralised) or ``.parquet``.
    metadata : dict, optional
        Provenance (e.g. :meth:`ScoringResult.metadata`: weights SHA-256,
        preprocessing, counts); written beside as ``<path>.json`` and, for
        Parquet, also into the file's schema metadata.
    """
    import json

    from covreport._io import atomic_write_bytes, atomic_write_text, write_csv_atomic

    path = Path(path)
    suffix = _suffix(path)
    meta_text = None
    if metadata is not None:
        meta_text = json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if suffix == ".csv":
        write_csv_atomic(df, path, error_class=ScoresError)
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ScoresError(
                f"{path}: writing Parquet needs pyarrow (pip install 'covreport[parquet]'); "
                "or write .csv"
            ) from None
        table = pa.Table.from_pandas(df, preserve_index=False)
        if meta_text is not None:
            table = table.replace_schema_metadata(
                {**(table.schema.metadata or {}), b"covreport": meta_text.encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(path, buf.getvalue(), error_class=ScoresError)
    if meta_text is not None:
        atomic_write_text(Path(f"{path}.json"), meta_text, error_class=ScoresError)
    return path


def _show(value):
    """A cell for an error message: text quoted (control characters escaped), numbers plain."""
    from covreport.inputs import safe_text

    if isinstance(value, str):
        return "'" + safe_text(value, limit=80) + "'"
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "an empty cell"
    return safe_text(value.item() if hasattr(value, "item") else value, limit=80)


#: Largest magnitude a feature may have: features are kept as float32.
FEATURE_MAX = float(np.finfo(np.float32).max)


def _csv_header(fh):
    """``(names, line)``: the header row of a CSV as written (not de-duplicated by pandas), and its line.

    Blank lines before the header are skipped, as pandas skips them.
    """
    import csv

    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
    try:
        reader = csv.reader(text)
        for row in reader:
            if row:
                return row, reader.line_num
        return None, reader.line_num
    finally:
        text.detach()


def _csv_line_of(fh, record):
    """The line of a CSV file on which data record ``record`` (0-based, after the header) starts.

    Counts what pandas counts: blank lines are skipped, a quoted cell may
    hold line breaks. Only called to word an error message.
    """
    import csv

    fh.seek(0)
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="", errors="replace")
    try:
        reader = csv.reader(text)
        seen = -1  # the header is record -1
        start = 1
        for row in reader:
            if row:
                if seen == record:
                    return start
                seen += 1
            start = reader.line_num + 1
        return None
    finally:
        text.detach()


def _numeric_block(df, columns):
    """``df[columns]`` as a float64 array; cells that are not numbers (text, booleans) become NaN.

    Columns pandas already parsed as numbers are converted in one step (no
    per-column work, so thousands of columns stay fast).
    """
    n = len(df)
    out = np.empty((n, len(columns)), dtype=np.float64)
    dtypes = df.dtypes
    numeric = [i for i, c in enumerate(columns)
               if pd.api.types.is_numeric_dtype(dtypes[c]) and not pd.api.types.is_bool_dtype(dtypes[c])]
    if numeric:
        out[:, numeric] = df[[columns[i] for i in numeric]].to_numpy(dtype=np.float64)
    done = set(numeric)
    for i, c in enumerate(columns):
        if i not in done:
            s = df[c]
            if pd.api.types.is_bool_dtype(s.dtype):
                out[:, i] = np.nan
            else:
                s = s.map(lambda v: np.nan if isinstance(v, bool) else v) if s.dtype == object else s
                out[:, i] = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
    return out


def read_scores(path, labels=None, *, require_features=False):
    """Read and validate a scores file (CSV or Parquet).

    Parameters
    ----------
    path : path
    labels : sequence of str, optional
        Label columns that must be present; default: every column that is not
        ``image`` or ``feat_*``.
    require_features : bool
        Require all 1,024 ``feat_*`` columns (the prediction analysis needs them).

    Returns
    -------
    pandas.DataFrame
        ``image`` (str), the label columns (float64, in ``[0, 1]``), then the
        feature columns (float32) if present.

    Raises
    ------
    ScoresError
        Naming the file and the problem: missing file (or not a regular file,
        or larger than the limit of :data:`covreport.inputs.LIMITS`), no
        ``image`` column, a column name written twice or empty, missing label
        or feature columns, duplicated images, non-numeric, missing or
        out-of-range probabilities, features that are not finite float32
        numbers. Rows are named by the file's line (the header is line 1 of
        a CSV; rows of a Parquet file count from 1).

    Notes
    -----
    The header is read as written: pandas would rename a second ``Edema``
    column to ``Edema.1`` and make it a label. The work is linear in the
    number of columns (20,000 extra columns read in seconds; see
    ``benchmarks/bench_scores_wide.py``).
    """
    from covreport.inputs import open_binary, safe_text

    path = Path(path)
    suffix = _suffix(path)
    name = safe_text(str(path))
    csv_file = suffix == ".csv"
    with open_binary(path, "scores file", error_class=ScoresError) as fh:
        try:
            if csv_file:
                header, header_line = _csv_header(fh)
                if header is None:
                    raise ScoresError(f"scores file {name} is empty -- write a header line "
                                      f"({IMAGE_COLUMN!r}, one column per label, feat_*) and one row per image")
                fh.seek(0)
                df = pd.read_csv(fh, dtype={IMAGE_COLUMN: str}, keep_default_na=False, index_col=False,
                                 float_precision="round_trip",  # exact: pandas' default parser is off by 1 ulp
                                 na_values=["", "NA", "NaN", "nan"], encoding="utf-8-sig")
            else:
                df = pd.read_parquet(fh)
                header, header_line = [str(c) for c in df.columns], None
        except ScoresError:
            raise
        except ImportError:
            raise ScoresError(f"{name}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        except MemoryError:
            raise ScoresError(f"scores file {name} is too large to read in the memory available -- "
                              "score fewer images per file, or keep only the columns covreport reads") from None
        except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError,
                pd.errors.EmptyDataError) as exc:
            raise ScoresError(f"cannot read scores file {name}: {safe_text(exc)}") from None
        except Exception as exc:  # pyarrow and csv raise their own types on a damaged file
            raise ScoresError(f"cannot read scores file {name}: {type(exc).__name__}: {safe_text(exc)}") from None
        if csv_file:
            from covreport._io import unescape_csv_cell

            header = [unescape_csv_cell(c) for c in header]
            if len(header) != len(df.columns):
                raise ScoresError(f"scores file {name}: the header (line {header_line}) names {len(header)} "
                                  f"columns but the rows hold {len(df.columns)} -- give every column one name")
            df.columns = header
            if IMAGE_COLUMN in df.columns:
                df[IMAGE_COLUMN] = df[IMAGE_COLUMN].map(unescape_csv_cell)

        def where(r):
            """Where data record ``r`` (0-based) is: ``line N`` of a CSV, ``row N`` of a Parquet file."""
            if not csv_file:
                return f"row {r + 1}"
            line = _csv_line_of(fh, r)
            return f"line {line}" if line is not None else f"data row {r + 1}"

        return _validate_scores(df, name, header, header_line, labels, require_features, where)


def _validate_scores(df, name, header, header_line, labels, require_features, where):
    """The checks of :func:`read_scores` on the frame as read (columns named as written)."""
    from collections import Counter

    from covreport.inputs import identifier_problem

    on = f" (line {header_line})" if header_line is not None else ""
    counts = Counter(header)
    for i, col in enumerate(header):
        if not col.strip():
            raise ScoresError(f"scores file {name}: column {i + 1} of the header{on} has no name -- name it "
                              "or delete the column (an index written by pandas' to_csv(index=True)?)")
    dup = [c for c in header if counts[c] > 1]
    if dup:
        first = dup[0]
        cols = [str(i + 1) for i, c in enumerate(header) if c == first]
        raise ScoresError(f"scores file {name}: columns {' and '.join(cols)} of the header{on} are both named "
                          f"{_show(first)} -- each column needs its own name; delete or rename the copy")
    if IMAGE_COLUMN not in counts:
        raise ScoresError(f"scores file {name} has no {IMAGE_COLUMN!r} column")
    feats = [c for c in header if c.startswith(FEATURE_PREFIX)]
    present = [c for c in header if c != IMAGE_COLUMN and not c.startswith(FEATURE_PREFIX)]
    if labels is None:
        labels = present
        if not labels:
            raise ScoresError(f"scores file {name} has no label columns "
                              f"(columns other than {IMAGE_COLUMN!r} and '{FEATURE_PREFIX}*')")
    labels = [str(v) for v in labels]
    for lab in labels:
        problem = identifier_problem(lab)
        if problem is not None and lab in counts:
            raise ScoresError(f"scores file {name}: label column {_show(lab)}{on} {problem}")
    reserved = [c for c in labels if c in MANIFEST_COLUMNS]
    if reserved:
        raise ScoresError(f"scores file {name}: column(s) {', '.join(map(repr, reserved))} would be read as "
                          "labels but are manifest columns; a scores file holds 'image', one probability "
                          "column per label and feat_* only: remove or rename them")
    missing = [c for c in labels if c not in counts]
    if missing:
        shown = ", ".join(_show(c)[1:-1] for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ScoresError(f"scores file {name} is missing label column(s): {shown}")
    expected_feats = feature_columns()
    if feats or require_features:
        missing_f = [c for c in expected_feats if c not in counts]
        if missing_f:
            shown = ", ".join(missing_f[:3]) + (", ..." if len(missing_f) > 3 else "")
            raise ScoresError(
                f"scores file {name} is missing {len(missing_f)} feature column(s): {shown} "
                f"(expected {expected_feats[0]} ... {expected_feats[-1]})"
            )
        extra = sorted(set(feats) - set(expected_feats))
        if extra:
            shown = ", ".join(_show(c) for c in extra[:3])
            raise ScoresError(f"scores file {name} has unexpected feature column(s): {shown}")
    images = df[IMAGE_COLUMN]
    blank = images.isna() | (images.astype(str).str.strip() == "")
    if blank.any():
        r = int(np.flatnonzero(blank.to_numpy())[0])
        raise ScoresError(f"scores file {name}, {where(r)}: empty {IMAGE_COLUMN!r} -- every row needs "
                          "the image it scores")
    images = images.astype(str)
    dups = images.duplicated()
    if dups.any():
        r = int(np.flatnonzero(dups.to_numpy())[0])
        raise ScoresError(f"scores file {name}, {where(r)}: image {_show(images.iloc[r])} appears more than once")
    probs = _numeric_block(df, labels)
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    if bad.any():
        r, c = (int(v[0]) for v in np.nonzero(bad))
        raise ScoresError(
            f"scores file {name}, {where(r)}, column {_show(labels[c])}: {_show(df[labels[c]].iloc[r])} is not "
            "a probability in [0, 1]"
        )
    parts = [pd.DataFrame({IMAGE_COLUMN: pd.Series(images.tolist(), dtype=str)}),
             pd.DataFrame(probs, columns=labels)]
    if feats:
        block = _numeric_block(df, expected_feats)
        bad = ~(np.abs(block) <= FEATURE_MAX)  # NaN, inf and what float32 cannot hold
        if bad.any():
            r, c = (int(v[0]) for v in np.nonzero(bad))
            raise ScoresError(
                f"scores file {name}, {where(r)}, column {expected_feats[c]!r}: "
                f"{_show(df[expected_feats[c]].iloc[r])} is not a finite number a float32 feature can hold "
                f"(|value| <= {FEATURE_MAX:.6g}) -- re-score that image"
            )
        parts.append(pd.DataFrame(block.astype(np.float32), columns=expected_feats))
    return pd.concat(parts, axis=1)
