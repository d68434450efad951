"""covreport.train: CheXpert layout, uncertainty policies, weighted loss, training, resume, torchrun."""

import hashlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from covreport import train as T
from covreport.chexpert import read_chexpert_split
from covreport.cli import main
from covreport.constants import CHEXPERT_LABELS, DEFAULT_LABELS
from covreport.errors import ModelError
from covreport.model import load_checkpoint

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=64, batch_size=8, init="none", num_workers=0)


def make_chexpert_tree(base, n_train=32, n_valid=12, seed=0, side=48):
    """A tiny CheXpert-v1.0-small tree: real columns, -1 and blanks, learnable Cardiomegaly.

    Cardiomegaly-positive images carry a bright central square; the other
    labels are random codes (train: 1, 0, -1, blank; valid: 1, 0).
    """
    rng = np.random.default_rng(seed)
    root = Path(base) / "CheXpert-v1.0-small"
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows = []
        for i in range(n):
            positive = i % 2 == 0
            img = rng.normal(0.3, 0.05, (side, side))
            if positive:
                img[side // 4: 3 * side // 4, side // 4: 3 * side // 4] += 0.5
            frontal = i % 4 != 3
            rel = (Path("CheXpert-v1.0-small") / split / f"patient{i // 2 + 1:05d}" / "study1"
                   / f"view1_{'frontal' if frontal else 'lateral'}.jpg")
            (Path(base) / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(Path(base) / rel)
            row = {"Path": rel.as_posix(), "Sex": "Female" if i % 3 else "Male", "Age": 40 + i,
                   "Frontal/Lateral": "Frontal" if frontal else "Lateral",
                   "AP/PA": ("AP" if i % 2 else "PA") if frontal else np.nan}
            for lab in CHEXPERT_LABELS:
                row[lab] = rng.choice([1.0, 0.0, -1.0, np.nan]) if split == "train" else rng.choice([1.0, 0.0])
            row["Cardiomegaly"] = 1.0 if positive else (0.0 if split == "valid" or i % 3 else np.nan)
            rows.append(row)
        pd.DataFrame(rows).to_csv(root / f"{split}.csv", index=False)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_chexpert_tree(tmp_path_factory.mktemp("chexpert"))


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory):
    """One 3-epoch run shared by several tests (lr 1e-3: a few steps must move the loss)."""
    out = tmp_path_factory.mktemp("run") / "m.pt"
    config = T.TrainConfig(epochs=3, lr=1e-3, **TINY)
    return T.train(tree, out, config, progress=False, keep_epochs=True), config


# --- labels ------------------------------------------------------------------------


def test_label_targets_hand_example():
    df = pd.DataFrame({"A": [1.0, 0.0, -1.0, np.nan], "B": [-1.0, -1.0, 1.0, ""]})
    expected = {
        # policy: (targets, mask), written out by hand
        "zeros": ([[1, 0], [0, 0], [0, 1], [0, 0]], [[1, 1]] * 4),
        "ones": ([[1, 1], [0, 1], [1, 1], [0, 0]], [[1, 1]] * 4),
        "ignore": ([[1, 0], [0, 0], [0, 1], [0, 0]], [[1, 0], [1, 0], [0, 1], [1, 1]]),
    }
    for policy, (t, m) in expected.items():
        targets, mask = T.label_targets(df, ["A", "B"], policy)
        assert targets.dtype == torch.float32 and mask.dtype == torch.bool
        assert targets.tolist() == t, policy
        assert mask.int().tolist() == m, policy


def test_label_targets_refuse_unknown_codes():
    df = pd.DataFrame({"A": [1.0, 2.0]})
    with pytest.raises(ModelError) as info:
        T.label_targets(df, ["A"], source="train.csv")
    assert str(info.value) == ("train.csv, data row 2, column 'A': 2.0 is not 1 (positive), 0 (negative), "
                               "-1 (uncertain) or blank.")
    with pytest.raises(ModelError, match="lacks label column"):
        T.label_targets(df, ["B"])
    with pytest.raises(ModelError, match="Uncertainty policy must be one of zeros, ones, ignore"):
        T.label_targets(df, ["A"], "maybe")


def _chexpert_label_csv():
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.skip("torchxrayvision (the xrv extra) is not installed")
    path = Path(spec.origin).parent / "data" / "chexpert_train.csv.gz"
    if not path.is_file():
        pytest.skip(f"{path} not shipped in this torchxrayvision wheel")
    return path


def test_label_targets_match_hand_counts_on_real_chexpert_csv():
    # The real CheXpert training label CSV shipped in the torchxrayvision wheel
    # (223,414 rows). Reference counts computed independently with pandas.
    df = pd.read_csv(_chexpert_label_csv())
    labels = list(DEFAULT_LABELS)
    n = len(df)
    pos = {lab: int((df[lab] == 1).sum()) for lab in labels}
    unc = {lab: int((df[lab] == -1).sum()) for lab in labels}
    assert n == 223414 and sum(unc.values()) > 0 and df[labels].isna().any().all()
    t0, m0 = T.label_targets(df, labels, "zeros")
    t1, m1 = T.label_targets(df, labels, "ones")
    ti, mi = T.label_targets(df, labels, "ignore")
    for j, lab in enumerate(labels):
        assert int(t0[:, j].sum()) == pos[lab], lab
        assert int(m0[:, j].sum()) == n
        assert int(t1[:, j].sum()) == pos[lab] + unc[lab], lab
        assert int(m1[:, j].sum()) == n
        assert int(ti[:, j].sum()) == pos[lab], lab
        assert int(mi[:, j].sum()) == n - unc[lab], lab
    # blank rows are counted negatives under every policy
    blank = torch.from_numpy(df[labels].isna().to_numpy())
    assert (t1[blank] == 0).all() and mi[blank].all()


def test_pos_weights_are_negatives_over_positives():
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.ones_like(targets, dtype=torch.bool)
    mask[4, 1] = False
    # by hand: label 0: 3 neg / 2 pos; label 1: 2 neg (row 4 masked) / 2 pos; label 2: no positive -> 1
    assert T.pos_weights(targets, mask).tolist() == pytest.approx([1.5, 1.0, 1.0])


def test_masked_bce_matches_torch_bce_with_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    targets = (torch.rand(6, 3, generator=g) > 0.5).float()
    pw = torch.tensor([2.0, 0.5, 1.0])
    full = torch.ones(6, 3, dtype=torch.bool)
    # Reference: torch.nn.BCEWithLogitsLoss with pos_weight, mean reduction.
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pw)(logits, targets)
    torch.testing.assert_close(T.masked_bce(logits, targets, full, pw), ref)
    mask = full.clone()
    mask[0, 0] = mask[3, 2] = False
    # Reference: the BCE formula written out in numpy over the kept entries.
    z, y, w = logits.numpy().astype(float), targets.numpy(), pw.numpy()
    sig = 1 / (1 + np.exp(-z))
    per = -(w * y * np.log(sig) + (1 - y) * np.log(1 - sig))
    keep = mask.numpy()
    assert float(T.masked_bce(logits, targets, mask, pw)) == pytest.approx(per[keep].mean(), rel=1e-5)


# --- CheXpert layout ---------------------------------------------------------------


def test_read_chexpert_split_locates_images_and_reports_problems(tree, tmp_path):
    df = read_chexpert_split(tree, "train", DEFAULT_LABELS)
    assert len(df) == 32 and all(Path(f).is_file() for f in df["_file"])
    assert df["_file"].iloc[0] == str(tree.parent / df["Path"].iloc[0])
    with pytest.raises(ModelError) as info:
        read_chexpert_split(tmp_path, "train", DEFAULT_LABELS)
    assert str(info.value).startswith(f"{tmp_path / 'train.csv'} not found: --chexpert-root must be")
    bad = tmp_path / "CheXpert-v1.0-small"
    bad.mkdir()
    pd.read_csv(tree / "train.csv").drop(columns=["Edema"]).to_csv(bad / "train.csv", index=False)
    with pytest.raises(ModelError, match=r"lacks column\(s\) \['Edema'\]"):
        read_chexpert_split(bad, "train", DEFAULT_LABELS)
    frame = pd.read_csv(tree / "train.csv")
    frame.loc[5, "Path"] = "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg"
    moved = tmp_path / "moved"
    moved.mkdir()
    frame.to_csv(moved / "train.csv", index=False)
    os.symlink(tree / "train", moved / "train")  # folder renamed: paths resolved from the root itself
    with pytest.raises(ModelError) as info:
        read_chexpert_split(moved, "train", DEFAULT_LABELS)
    assert str(info.value) == (f"{moved / 'train.csv'}: 1 image(s) not found, the first at data row 6: "
                               f"{moved / 'train/patient99999/study1/view1_frontal.jpg'}. "
                               "Complete the dataset or remove those rows.")


def test_train_config_validates():
    with pytest.raises(ModelError, match="image_size must be an integer >= 64"):
        T.TrainConfig(image_size=32)
    with pytest.raises(ModelError, match="Uncertainty policy"):
        T.TrainConfig(uncertainty="half")
    assert T.TrainConfig().to_dict()["betas"] == [0.9, 0.999]
    d = T.TrainConfig()
    assert (d.labels, d.uncertainty, d.image_size, d.epochs, d.batch_size, d.lr, d.init) == (
        DEFAULT_LABELS, "zeros", 320, 3, 16, 1e-4, "imagenet")


# --- initial weights -----------------------------------------------------------------


def test_init_imagenet_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("covreport must never download at run time"))
    with pytest.raises(ModelError) as info:
        T.initial_model(T.TrainConfig(init="imagenet"))
    cached = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    msg = str(info.value)
    assert msg.startswith(f"ImageNet weights for DenseNet121 are not cached at {cached}, "
                          "and covreport does not download at run time.")
    assert msg.endswith("or use --init none or --init FILE.")


def test_init_imagenet_uses_the_cached_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("must not download when cached"))
    torch.manual_seed(5)
    imagenet = torchvision.models.densenet121(weights=None)
    cached = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cached)
    net = T.initial_model(T.TrainConfig(init="imagenet", labels=("Edema", "Cardiomegaly")))
    assert net.classifier.out_features == 2
    assert torch.equal(net.features.conv0.weight, imagenet.features.conv0.weight)
    assert torch.equal(net.features.norm5.running_var, imagenet.features.norm5.running_var)


def test_init_from_file_reuses_trunk_and_matching_classifier(trained, tmp_path):
    out, config = trained
    loaded = load_checkpoint(out)
    same = T.initial_model(T.TrainConfig(init=str(out)))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), loaded.model.state_dict().values()))
    other = T.initial_model(T.TrainConfig(init=str(out), labels=("Edema",)))
    assert torch.equal(other.features.conv0.weight, loaded.model.features.conv0.weight)
    assert other.classifier.out_features == 1
    state = tmp_path / "state.pt"
    torch.save(loaded.model.state_dict(), state)
    from_state = T.initial_model(T.TrainConfig(init=str(state)))
    assert torch.equal(from_state.classifier.weight, loaded.model.classifier.weight)
    with pytest.raises(ModelError, match="file not found"):
        T.initial_model(T.TrainConfig(init=str(tmp_path / "absent.pt")))


# --- training ----------------------------------------------------------------------------


def test_tiny_training_run_loss_falls_and_writes_checkpoint(trained, tree):
    out, config = trained
    loaded = load_checkpoint(out)
    meta = loaded.metadata
    history = meta["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert (meta["epochs_run"], meta["epochs_planned"]) == (3, 3)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = min(history, key=lambda h: h["val_loss"])
    assert meta["epoch"] == meta["best_epoch"] == best["epoch"]
    assert meta["val_loss"] == best["val_loss"]
    assert meta["train_csv_sha256"] == hashlib.sha256((tree / "train.csv").read_bytes()).hexdigest()
    assert meta["valid_csv_sha256"] == hashlib.sha256((tree / "valid.csv").read_bytes()).hexdigest()
    assert meta["training"]["uncertainty"] == "zeros" and meta["training"]["image_size"] == 64
    assert meta["training_data"]["images"] == 32 and meta["training_data"]["patients"] == 16
    assert meta["training_data"]["views"] == {"Frontal": 24, "Lateral": 8}
    assert "pos_weight = n_neg / n_pos" in meta["loss"]
    assert set(meta["packages"]) >= {"torch", "torchvision", "covreport"}
    assert loaded.labels == DEFAULT_LABELS
    assert loaded.preprocessing.size == 64
    # validation AUCs: in the checkpoint and as CSV beside it
    auc = pd.read_csv(out.with_name("m.validation_auc.csv"))
    assert list(auc.columns) == ["label", "n_pos", "n_neg", "auc", "se", "ci_low", "ci_high", "method", "note"]
    assert list(auc["label"]) == list(DEFAULT_LABELS)
    assert [r["label"] for r in meta["validation_auc"]] == list(DEFAULT_LABELS)
    np.testing.assert_allclose(auc["auc"], [r["auc"] for r in meta["validation_auc"]])
    assert auc.loc[auc.label == "Cardiomegaly", ["n_pos", "n_neg"]].values.tolist() == [[6, 6]]
    assert auc["method"].str.contains("DeLong").all()
    scores = pd.read_csv(out.with_name("m.validation_scores.csv"))
    assert list(scores.columns) == ["image", *DEFAULT_LABELS] and len(scores) == 12
    assert scores["image"].tolist() == pd.read_csv(tree / "valid.csv")["Path"].tolist()
    assert scores[list(DEFAULT_LABELS)].apply(lambda c: c.between(0, 1)).all().all()
    # one checkpoint per epoch, with optimizer state; the kept one is loadable by the scorer
    for e in (1, 2, 3):
        raw = torch.load(T.epoch_checkpoint_path(out, e), weights_only=True)
        assert raw["training_state"]["epoch"] == e and "state" in raw["training_state"]["optimizer"]
    assert "training_state" not in torch.load(out, weights_only=True)


@pytest.mark.slow
def test_resume_continues_exactly(tree, tmp_path):
    # four short runs (2 + 1 + 1 epochs of 2 steps): ~10 s idle, more on a busy CPU
    config1 = T.TrainConfig(epochs=1, max_images=16, **TINY)
    config2 = T.TrainConfig(epochs=2, max_images=16, **TINY)
    straight = T.train(tree, tmp_path / "a" / "m.pt", config2, progress=False, keep_epochs=True)
    T.train(tree, tmp_path / "b" / "m.pt", config1, progress=False, keep_epochs=True)
    assert not T.epoch_checkpoint_path(tmp_path / "b" / "m.pt", 2).exists()
    resumed = T.train(tree, tmp_path / "b" / "m.pt", config2, progress=False, resume=True, keep_epochs=True)
    a = torch.load(T.epoch_checkpoint_path(straight, 2), weights_only=True)
    b = torch.load(T.epoch_checkpoint_path(resumed, 2), weights_only=True)
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert [h["epoch"] for h in b["metadata"]["history"]] == [1, 2]
    assert b["metadata"]["history"][0] == a["metadata"]["history"][0]
    with pytest.raises(ModelError) as info:
        T.train(tree, tmp_path / "b" / "m.pt", T.TrainConfig(epochs=3, max_images=16, **{**TINY, "image_size": 96}),
                progress=False, resume=True)
    assert "was trained with different options image_size=64 (now 96)" in str(info.value)


def test_cli_train_runs_and_maps_errors(tree, tmp_path):
    out = tmp_path / "cli" / "m.pt"
    res = CliRunner().invoke(main, ["train", "--chexpert-root", str(tree), "--out", str(out), "--init", "none",
                                    "--image-size", "64", "--epochs", "1", "--batch-size", "8",
                                    "--max-images", "8", "--workers", "0", "--labels", "Cardiomegaly,Edema",
                                    "--uncertainty", "ignore", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    loaded = load_checkpoint(out)
    assert res.stdout.splitlines() == [
        f"Checkpoint: {out} (epoch 1 of 1, validation loss {loaded.metadata['val_loss']:.4f})",
        f"SHA-256: {loaded.sha256}",
        f"Validation AUCs: {tmp_path / 'cli' / 'm.validation_auc.csv'}",
    ]
    assert loaded.labels == ("Cardiomegaly", "Edema")
    assert loaded.metadata["training"]["uncertainty"] == "ignore"
    # only the kept checkpoint and its CSVs stay (no --keep-epochs)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "m.pt", "m.validation_auc.csv", "m.validation_scores.csv"]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["train", "--chexpert-root", str(empty), "--out", str(out), "--init", "none"])
    assert res.exit_code == 1
    assert res.stderr == (f"Error: {empty / 'train.csv'} not found: --chexpert-root must be the CheXpert folder "
                          "holding train.csv and valid.csv (e.g. CheXpert-v1.0-small).\n")
    res = CliRunner().invoke(main, ["train", "--chexpert-root", str(tree), "--out", str(tmp_path / "m.ckpt"),
                                    "--init", "none"])
    assert res.exit_code == 1
    assert res.stderr == f"Error: --out {tmp_path / 'm.ckpt'}: the checkpoint name must end in .pt or .pth.\n"


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tree, tmp_path):
    # two processes, each importing torch and training one epoch: ~12 s idle
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        from covreport.train import TrainConfig, train
        config = TrainConfig(image_size=64, epochs=1, batch_size=4, init="none", num_workers=0, max_images=16)
        train(sys.argv[1], sys.argv[2], config, progress=False)
    """))
    out = tmp_path / "ddp" / "m.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), str(tree), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_checkpoint(out)
    assert loaded.metadata["world_size"] == 2
    assert loaded.metadata["train_csv"]["rows_used"] == 16
    assert out.with_name("m.validation_auc.csv").is_file()
    assert not list(out.parent.glob(".*.tmp"))
