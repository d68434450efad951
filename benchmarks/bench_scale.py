"""Scale benchmark (issue 7): validation, statistics, scoring, and the cost of a rerun.

Each figure is measured in one run of this script, on synthetic data made in
a temporary folder, and printed as a per-item cost or a ratio:

1. validation of a ``--pairs`` (100,000) pair manifest without opening
   images, with every outcome filled and with every outcome empty (all
   pairs excluded); CPU-seconds and microseconds per pair;
2. statistics on ``--stats-pairs`` (10,000) pairs: Table 1, group
   comparisons and the leave-one-patient-out prediction by every protocol
   (the penalised primary one included), via
   :func:`covreport.pipeline.compute_statistics`, no permutations and no
   resamples; seconds and milliseconds per pair;
3. scoring throughput of :func:`covreport.scoring.score_images` on
   ``--images`` small PNGs with a DenseNet121 at ``--size`` px: images per
   second without cache, and with every image already in the cache;
4. the cost of a rerun after the manifest grows by 10%: ``covreport run
   --weights`` (no PDF, no permutations) on the manifest with a cold cache,
   then again after 10% more pairs with new images were added; only the new
   images may be scored. The ratio of the rerun to the full run is given for
   the scoring stage and for the whole run.

Usage::

    python benchmarks/bench_scale.py                    # the issue's sizes (most of an hour)
    python benchmarks/bench_scale.py --pairs 20000 --stats-pairs 2000 --images 20 --json out.json

Wall times depend on the machine's load (printed); CPU times less so.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


# --------------------------------------------------------------------------
# 1. validation


def bench_validate(folder, n_pairs):
    import pandas as pd

    sys.path.insert(0, str(HERE))
    from bench_validate import write_manifest  # the issue-2 benchmark's generator

    from covreport.manifest import read_manifest

    filled = folder / "manifest_100k.csv"
    write_manifest(filled, n_pairs)
    empty = folder / "manifest_100k_empty.csv"
    df = pd.read_csv(filled, dtype=str, keep_default_na=False)
    df["outcome"] = ""
    df.to_csv(empty, index=False)
    out = {}
    for name, path in (("filled", filled), ("empty", empty)):
        best = None
        for _ in range(2):
            t = _clock()
            m = read_manifest(path, check_images=False)
            wall, cpu = _since(t)
            best = (wall, cpu) if best is None or wall < best[0] else best
        assert len(m.pairs) == n_pairs
        assert len(m.exclusions) == (n_pairs if name == "empty" else 0)
        out[name] = {"pairs": n_pairs, "wall_s": best[0], "cpu_s": best[1],
                     "us_per_pair": 1e6 * best[0] / n_pairs}
        print(f"validate {n_pairs:,} pairs, outcomes {name}: {best[0]:.2f} s wall, {best[1]:.2f} CPU-s, "
              f"{out[name]['us_per_pair']:.1f} us/pair")
    return out


# --------------------------------------------------------------------------
# 2. statistics


def _stats_inputs(folder, n_pairs, seed=0):
    """A manifest of ``n_pairs`` pairs (4 per patient) and an in-memory scores table."""
    import pandas as pd

    from covreport.constants import DEFAULT_LABELS, feature_columns

    rng = np.random.default_rng(seed)
    outcomes = np.array(["Worse", "Stable", "Improved"])
    rows, images = [], []
    k = 0
    p = 0
    while k < n_pairs:
        names = [f"img/P{p:05d}_{i}.png" for i in range(5)]
        images += names
        for i in range(4):
            if k == n_pairs:
                break
            rows.append((f"pair{k:06d}", f"P{p:05d}", names[i], names[i + 1], outcomes[rng.integers(3)],
                         f"2020-03-{1 + i:02d}", f"2020-03-{2 + i:02d}", str(20 + p % 70), "MF"[p % 2]))
            k += 1
        p += 1
    manifest = folder / "manifest_stats.csv"
    pd.DataFrame(rows, columns=["pair_id", "patient_id", "first_image", "second_image", "outcome",
                                "first_date", "second_date", "age", "sex"]).to_csv(manifest, index=False)
    scores = pd.DataFrame({"image": images})
    for lab in DEFAULT_LABELS:
        scores[lab] = rng.random(len(images))
    feats = pd.DataFrame(rng.gamma(1.0, 1.0, (len(images), 1024)).astype(np.float32), columns=feature_columns())
    return manifest, pd.concat([scores, feats], axis=1), list(DEFAULT_LABELS)


def bench_statistics(folder, n_pairs):
    from covreport import pipeline
    from covreport.manifest import read_manifest

    manifest_path, scores, labels = _stats_inputs(folder, n_pairs)
    m = read_manifest(manifest_path, check_images=False)
    pairs, _ = pipeline._analysed_pairs(m, scores, labels)
    opts = pipeline.RunOptions(manifest=manifest_path, out=folder / "unused", permutations=0, bootstrap=0)
    t = _clock()
    results = pipeline.compute_statistics(pairs, labels, scores, opts)
    wall, cpu = _since(t)
    n = results["prediction"]["nested"]["n_pairs"]
    out = {"pairs": n_pairs, "pairs_predicted": n, "patients": int(pairs["patient_id"].nunique()),
           "wall_s": wall, "cpu_s": cpu, "ms_per_pair": 1e3 * wall / n_pairs}
    print(f"statistics on {n_pairs:,} pairs ({out['patients']:,} patients; prediction on {n:,} Worse/Improved "
          f"pairs, 1,024 features, every protocol once, no permutations or resamples): {wall:.1f} s wall, "
          f"{cpu:.1f} CPU-s, {out['ms_per_pair']:.2f} ms/pair")
    return out


# --------------------------------------------------------------------------
# 3 and 4. scoring and reruns


def _study(folder, n_patients, images_per_patient, side, seed, start=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    rows = []
    outcomes = ("Worse", "Improved", "Stable")
    for p in range(start, start + n_patients):
        names = [f"images/P{p:04d}_{i}.png" for i in range(images_per_patient)]
        for name in names:
            cx, cy = rng.random(2)
            img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) * 8) * 200 + rng.normal(0, 12, (side, side))
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name)
        for i in range(images_per_patient - 1):
            rows.append(f"pair{p:04d}_{i},P{p:04d},{names[i]},{names[i + 1]},{outcomes[(p + i) % 3]},"
                        f"2020-03-{1 + i:02d},2020-03-{2 + i:02d},{30 + p % 50},{'MF'[p % 2]}")
    return rows


def _weights(folder, size):
    import torch

    from covreport.constants import DEFAULT_LABELS
    from covreport.images import Preprocessing
    from covreport.model import build_model, save_checkpoint

    torch.manual_seed(0)
    path = folder / "bench.pt"
    save_checkpoint(path, build_model(DEFAULT_LABELS), labels=DEFAULT_LABELS,
                    preprocessing=Preprocessing(size=size))
    return path


def bench_scoring(folder, n_images, size, side, weights):
    from covreport.cache import ScoreCache
    from covreport.model import load_checkpoint
    from covreport.scoring import score_images

    rows = _study(folder / "throughput", n_images // 4, 4, side, seed=1)
    images = sorted((folder / "throughput" / "images").glob("*.png"))
    loaded = load_checkpoint(weights)
    score_images(images[:2], loaded, num_workers=0)  # warm-up (one-time allocations)
    t = _clock()
    res = score_images(images, loaded, num_workers=2)
    wall, cpu = _since(t)
    assert res.scored == len(images)
    with ScoreCache(folder / "throughput.sqlite") as cache:
        score_images(images, loaded, cache=cache, num_workers=2)
        t2 = _clock()
        cached = score_images(images, loaded, cache=cache, num_workers=2)
        wall_c, _ = _since(t2)
    assert cached.from_cache == len(images) and cached.scored == 0
    out = {"images": len(images), "image_px": side, "model_px": size, "wall_s": wall, "cpu_s": cpu,
           "images_per_s": len(images) / wall, "ms_per_image": 1e3 * wall / len(images),
           "cached_images_per_s": len(images) / wall_c, "cached_ms_per_image": 1e3 * wall_c / len(images)}
    print(f"scoring {len(images)} {side}x{side} PNGs with DenseNet121 at {size} px (float32, 2 workers, "
          f"{os.cpu_count()} CPUs): {out['images_per_s']:.2f} images/s ({out['ms_per_image']:.0f} ms/image); "
          f"all from cache: {out['cached_images_per_s']:.0f} images/s ({out['cached_ms_per_image']:.1f} ms/image)")
    del rows
    return out


def bench_rerun(folder, n_patients, size, side, weights):
    from covreport.pipeline import RunOptions, run

    study = folder / "growing"
    study.mkdir()
    header = "pair_id,patient_id,first_image,second_image,outcome,first_date,second_date,age,sex"
    rows = _study(study, n_patients, 4, side, seed=2)
    manifest = study / "manifest.csv"
    manifest.write_text("\n".join([header] + rows) + "\n")
    cache = folder / "growing.sqlite"

    def one(out):
        t = _clock()
        run(RunOptions(manifest=manifest, out=out, weights=str(weights), cache=cache, permutations=0, pdf=False))
        wall, cpu = _since(t)
        flow = json.loads((out / "results.json").read_text())["flow"]
        return wall, cpu, flow

    import covreport.scoring as scoring

    stage = {}
    real = scoring.score_manifest

    def timed(*a, **k):  # the scoring stage alone, inside the whole run
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            stage["s"] = time.perf_counter() - t

    scoring.score_manifest = timed
    try:
        full_wall, full_cpu, flow1 = one(folder / "out1")
        full_stage = stage["s"]
        n_new = max(1, n_patients // 10)
        rows += _study(study, n_new, 4, side, seed=3, start=n_patients)
        manifest.write_text("\n".join([header] + rows) + "\n")
        re_wall, re_cpu, flow2 = one(folder / "out2")
        re_stage = stage["s"]
    finally:
        scoring.score_manifest = real
    images1 = flow1["images_in_manifest"]
    images2 = flow2["images_in_manifest"]
    assert flow1["images_scored"] == images1 and flow1["images_from_cache"] == 0
    assert flow2["images_scored"] == images2 - images1, flow2  # only the new images are scored
    assert flow2["images_from_cache"] == images1
    out = {"images_before": images1, "images_after": images2, "new_images": images2 - images1,
           "full_run_s": full_wall, "rerun_s": re_wall, "run_ratio": re_wall / full_wall,
           "full_scoring_s": full_stage, "rerun_scoring_s": re_stage, "scoring_ratio": re_stage / full_stage,
           "full_cpu_s": full_cpu, "rerun_cpu_s": re_cpu}
    print(f"rerun after +{100 * (images2 - images1) / images1:.0f}% images ({images1} -> {images2}; "
          f"{flow2['images_scored']} scored, {flow2['images_from_cache']} from cache): scoring stage "
          f"{re_stage:.1f} s vs {full_stage:.1f} s = ratio {out['scoring_ratio']:.2f}; whole run (no PDF) "
          f"{re_wall:.1f} s vs {full_wall:.1f} s = ratio {out['run_ratio']:.2f}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs of the validation benchmark")
    parser.add_argument("--stats-pairs", type=int, default=10_000, help="pairs of the statistics benchmark")
    parser.add_argument("--images", type=int, default=40, help="images of the scoring throughput benchmark")
    parser.add_argument("--rerun-patients", type=int, default=10,
                        help="patients (4 images each) of the rerun benchmark; 10%% more are added")
    parser.add_argument("--size", type=int, default=320, help="model input size (the study's: 320)")
    parser.add_argument("--image-px", type=int, default=256, help="side of the synthetic PNGs")
    parser.add_argument("--only", nargs="*", default=["validate", "statistics", "scoring", "rerun"])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ.setdefault("COVREPORT_CACHE_DIR", str(folder / "user-cache"))
        weights = None
        if "validate" in args.only:
            figures["validate"] = bench_validate(folder, args.pairs)
        if "statistics" in args.only:
            figures["statistics"] = bench_statistics(folder, args.stats_pairs)
        if {"scoring", "rerun"} & set(args.only):
            weights = _weights(folder, args.size)
        if "scoring" in args.only:
            figures["scoring"] = bench_scoring(folder, args.images, args.size, args.image_px, weights)
        if "rerun" in args.only:
            figures["rerun"] = bench_rerun(folder, args.rerun_patients, args.size, args.image_px, weights)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    figures["machine"] = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "load_average": load,
                          "torch_threads": torch.get_num_threads()}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {load:.1f} (wall times grow with the load)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
