"""Score images with the model, through the cache.

Each distinct image (by content SHA-256) is run once, and not at all when the
cache already holds its output for these weights and preprocessing. The
network itself runs in :mod:`covreport.inference`; scores files are read and
written by :mod:`covreport.scores_file` (:func:`read_scores` and
:func:`write_scores` are re-exported here).
"""

import dataclasses
import time
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from covreport import progress as _progress
from covreport.constants import IMAGE_COLUMN, N_FEATURES, feature_columns
from covreport.errors import ImageError, ModelError, ScoresError
from covreport.inference import (  # noqa: F401  (PRECISIONS re-exported)
    PRECISIONS, _BatchDataset, _batches, _bf16_supported, _device_of, _forward, _normalise_precision, _prepare_model,
    output_problem,
)
from covreport.scores_file import SCORES_SUFFIXES, _suffix, read_scores, write_scores  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


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
        model = _prepare_model(loaded, run_device, precision)
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
