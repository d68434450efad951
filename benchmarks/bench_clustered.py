"""Benchmark: the statistics of issue 11 (clustered inference, bootstrap, every protocol's permutations).

Run:  python benchmarks/bench_clustered.py [--permutations N] [--bootstrap N] [--no-run]

Prints
  (a) a 100-pair / 60-patient study (1,024 features) with 1,000 permutations
      for each prediction protocol and 2,000 cluster-bootstrap resamples:
      the wall time of each part of ``pipeline.compute_statistics`` and of
      the whole ``covreport run MANIFEST --scores S --no-pdf`` (a subprocess;
      ``--no-run`` skips it). Goal: the run within 60 s on the 2-core machine.
  (b) Obuchowski's clustered AUC variance for 10,000 pairs (5,000 patients),
      beside DeLong's for the same scores. Goal: under 1 s.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopo import make_study  # noqa: E402

from covreport.constants import DEFAULT_LABELS, feature_columns  # noqa: E402
from covreport.progress import set_quiet  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_timed(fn):
    """Wall and CPU seconds (this process and its children) of fn()."""
    t0, c0 = time.perf_counter(), os.times()
    out = fn()
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) \
        + (c1.children_system - c0.children_system)
    return time.perf_counter() - t0, cpu, out


def write_study(folder, n_patients=60, n_pairs=100, seed=0):
    """A manifest and a scores file: outcome Worse/Improved from the bench_lopo generator, some Stable."""
    X1, y, groups = make_study(n_patients, n_pairs, seed=seed)
    X2, _, _ = make_study(n_patients, n_pairs, seed=seed + 1)
    rng = np.random.default_rng(seed)
    outcome = np.where(y == 1, "Worse", "Improved").astype(object)
    outcome[rng.random(n_pairs) < 0.15] = "Stable"
    rows, images, feats = [], [], []
    seen = {}
    for i, (g, o) in enumerate(zip(groups, outcome)):
        k = seen.get(g, 0)
        seen[g] = k + 1
        first, second = f"img/P{g:03d}_{k}_a.png", f"img/P{g:03d}_{k}_b.png"
        rows.append({"pair_id": f"pair{i:04d}", "patient_id": f"P{g:03d}", "first_image": first,
                     "second_image": second, "outcome": o, "first_offset_days": 4 * k,
                     "second_offset_days": 4 * k + 3, "age": 30 + g % 50, "sex": "MF"[g % 2]})
        images += [first, second]
        feats += [X1[i], X2[i]]
    manifest = pd.DataFrame(rows)
    scores = pd.DataFrame({"image": images})
    for lab in DEFAULT_LABELS:
        scores[lab] = rng.random(len(images))
    scores = pd.concat([scores, pd.DataFrame(np.array(feats), columns=feature_columns())], axis=1)
    manifest.to_csv(folder / "manifest.csv", index=False)
    scores.to_csv(folder / "scores.csv", index=False)
    return folder / "manifest.csv", folder / "scores.csv"


def bench_study(args):
    from covreport.manifest import read_manifest
    from covreport.pipeline import RunOptions, _analysed_pairs, compute_statistics, label_columns
    from covreport.scores_file import read_scores
    from covreport.stats import compare_groups, predict_outcome
    from covreport.stats.clustered import cluster_bootstrap, group_differences_clustered

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest_path, scores_path = write_study(tmp)
        scores = read_scores(scores_path)
        manifest = read_manifest(manifest_path, check_images=False).exclude_unscored(scores["image"])
        labels = label_columns(scores)
        pairs, _ = _analysed_pairs(manifest, scores, labels)
        n_wi = int(pairs["outcome"].isin(["Worse", "Improved"]).sum())
        print(f"(a) {len(pairs)} pairs ({n_wi} Worse/Improved), {pairs['patient_id'].nunique()} patients, "
              f"1,024 features, {len(labels)} labels; {args.permutations} permutations per protocol, "
              f"{args.bootstrap} bootstrap resamples")
        opts = RunOptions(manifest=manifest_path, out=tmp / "out", scores=scores_path,
                          permutations=args.permutations, bootstrap=args.bootstrap)
        t_all, cpu_all, _ = cpu_timed(lambda: compute_statistics(pairs, labels, scores, opts))
        changes = pairs[["patient_id", "outcome"]].copy()
        for lab in labels:
            changes[lab] = pairs[f"{lab} change"]
        t_groups, _ = timed(lambda: compare_groups(changes, labels))
        t_clust, _ = timed(lambda: group_differences_clustered(changes, labels, changes["patient_id"]))
        feats = feature_columns()
        by = scores.set_index("image")
        first = by.loc[pairs["first_image"], feats].reset_index(drop=True)
        second = by.loc[pairs["second_image"], feats].reset_index(drop=True)
        t_pred, pred = timed(lambda: predict_outcome(first, second, pairs["outcome"].to_numpy(),
                                                     pairs["patient_id"].to_numpy(), pairs["pair_id"].to_numpy(),
                                                     n_permutations=args.permutations))
        blocks = {k: {"patient_id": [r["patient_id"] for r in pred[k]["pairs"]],
                      "outcome": [r["outcome"] == "Worse" for r in pred[k]["pairs"]],
                      "predicted": [r["predicted"] == "Worse" for r in pred[k]["pairs"]]}
                  for k in ("nested", "global", "reversed")}
        t_boot, _ = timed(lambda: cluster_bootstrap(pairs["patient_id"], blocks, changes, labels,
                                                    n_resamples=args.bootstrap))
        print(f"    compute_statistics, all of it:                 {t_all:7.2f} s wall, {cpu_all:.2f} CPU-s")
        print(f"      predict_outcome (3 protocols x permutations): {t_pred:7.2f} s")
        print(f"      cluster bootstrap ({args.bootstrap} resamples):          {t_boot:7.2f} s")
        print(f"      group differences, pair level / clustered:    {t_groups:7.2f} s / {t_clust:.2f} s")
        if not args.no_run:
            cmd = [sys.executable, "-m", "covreport", "run", str(manifest_path), "--scores", str(scores_path),
                   "--no-pdf", "--out", str(tmp / "run"), "--permutations", str(args.permutations),
                   "--bootstrap", str(args.bootstrap), "--quiet"]
            env = dict(os.environ)
            t_run, cpu_run, proc = cpu_timed(lambda: subprocess.run(cmd, capture_output=True, text=True, env=env))
            if proc.returncode != 0 and "--quiet" in proc.stderr:
                # --quiet may not exist on this branch yet
                cmd.remove("--quiet")
                t_run, cpu_run, proc = cpu_timed(lambda: subprocess.run(cmd, capture_output=True, text=True,
                                                                        env=env))
            status = "ok" if proc.returncode == 0 else f"FAILED: {proc.stderr.strip()[-300:]}"
            print(f"    covreport run --scores --no-pdf (whole command): {t_run:7.2f} s wall, {cpu_run:.2f} CPU-s "
                  f"(goal 60 s; {status})")
        print(f"    load average at the end: {os.getloadavg()[0]:.1f}")


def bench_obuchowski(n_pairs=10_000, n_patients=5_000, seed=0):
    from covreport.stats.auc import delong_auc
    from covreport.stats.clustered import obuchowski_auc

    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_patients, n_pairs)
    effect = rng.normal(size=n_patients)[groups]
    y = (rng.random(n_pairs) < 0.5).astype(int)
    s = effect + y + rng.normal(size=n_pairs)
    ids = np.array([f"P{g:05d}" for g in groups], dtype=object)
    best = min(timed(lambda: obuchowski_auc(y, s, ids))[0] for _ in range(3))
    res = obuchowski_auc(y, s, ids)
    t_d = min(timed(lambda: delong_auc(y, s))[0] for _ in range(3))
    ref = delong_auc(y, s)
    print(f"(b) Obuchowski clustered AUC, {n_pairs:,} pairs / {res['clusters']:,} patients: "
          f"{best * 1000:.0f} ms (goal < 1 s); DeLong on the same scores {t_d * 1000:.0f} ms "
          f"(AUC {res['auc']:.4f}, clustered SE {res['se']:.5f} vs DeLong SE {ref['se']:.5f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--no-run", action="store_true", help="skip the covreport run subprocess")
    args = parser.parse_args()
    set_quiet(True)
    bench_study(args)
    bench_obuchowski()


if __name__ == "__main__":
    main()
