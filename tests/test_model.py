"""covreport.model: DenseNet121, features, safe checkpoints, weights lookup, xrv, CAMs."""

import hashlib
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
from torch import nn

from covreport import model as M
from covreport.constants import DEFAULT_LABELS
from covreport.errors import ModelError
from covreport.images import Preprocessing, to_tensor

torch.set_num_threads(2)
SMALL = Preprocessing(size=64)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return M.build_model().eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=g)


# --- building and running -------------------------------------------------------


def test_build_model_has_one_logit_per_label(net):
    assert isinstance(net.classifier, nn.Linear)
    assert (net.classifier.in_features, net.classifier.out_features) == (1024, len(DEFAULT_LABELS))
    other = M.build_model(["Edema", "Cardiomegaly"])
    assert other.classifier.out_features == 2
    with pytest.raises(ModelError, match="distinct"):
        M.build_model(["Edema", "Edema"])


def test_features_and_logits_match_torchvision_forward(net, batch):
    with torch.no_grad():
        feats, logits = M.features_and_logits(net, batch)
        # Independent references: torchvision's own DenseNet.forward (ReLU, pool,
        # classifier) and a hand-written mean over the spatial dimensions.
        ref_logits = net(batch)
        ref_feats = torch.relu(net.features(batch)).mean(dim=(2, 3))
    assert feats.shape == (2, 1024) and logits.shape == (2, len(DEFAULT_LABELS))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-6)
    assert (feats >= 0).all()


# --- checkpoints ----------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, net, batch):
    path = tmp_path / "sub" / "m.pt"
    M.save_checkpoint(path, net, labels=DEFAULT_LABELS, preprocessing=SMALL,
                      metadata={"validation_auc": [{"label": "Edema", "auc": np.float64(0.8)}],
                                "train_csv_sha256": "ab" * 32})
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    loaded = M.load_checkpoint(path)
    assert loaded.labels == DEFAULT_LABELS
    assert loaded.preprocessing == SMALL
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.metadata["validation_auc"] == [{"label": "Edema", "auc": 0.8}]
    assert loaded.metadata["train_csv_sha256"] == "ab" * 32
    assert loaded.metadata["packages"]["torch"] == str(torch.__version__)
    assert loaded.source == str(path)
    assert not loaded.model.training
    with torch.no_grad():
        f0, l0 = M.features_and_logits(net, batch)
        f1, l1 = M.features_and_logits(loaded, batch)
    assert torch.equal(f0, f1) and torch.equal(l0, l1)


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_old_one(tmp_path, net, monkeypatch):
    # torch's zip writer reports a short write (a full disk) as this RuntimeError, as it did in CI.
    path = tmp_path / "m.pt"
    path.write_bytes(b"the user's earlier file")

    def full_disk(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 80184768 vs 80184656")

    monkeypatch.setattr(M.torch, "save", full_disk)
    with pytest.raises(ModelError) as err:
        M.save_checkpoint(path, net, labels=DEFAULT_LABELS, preprocessing=SMALL)
    assert str(err.value) == (
        f"cannot write {path}: the write failed ([enforce fail at inline_container.cc:672] . unexpected pos "
        "80184768 vs 80184656) (check that the folder exists, is writable and has free space)")
    assert path.read_bytes() == b"the user's earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_save_refuses_label_count_mismatch_and_unplain_metadata(tmp_path, net):
    with pytest.raises(ModelError, match="10 outputs but 2 labels"):
        M.save_checkpoint(tmp_path / "a.pt", net, labels=["A", "B"], preprocessing=SMALL)
    with pytest.raises(ModelError, match="holds a object"):
        M.save_checkpoint(tmp_path / "a.pt", net, labels=DEFAULT_LABELS, preprocessing=SMALL,
                          metadata={"bad": object()})
    assert not (tmp_path / "a.pt").exists()


class _RunsCode:
    """A pickle payload that touches a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    # Control: plain pickle really executes the payload (so the test can fail).
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_RunsCode(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"format": M.CHECKPOINT_FORMAT, "version": 1, "labels": ["A"], "preprocessing": {},
                "state_dict": {}, "metadata": {"x": _RunsCode(marker)}}, wrapped)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    for path in (wrapped, raw):
        with pytest.raises(ModelError) as info:
            M.load_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"{path} is not a covreport checkpoint: it cannot be loaded safely")
        assert "never unpickles arbitrary objects" in msg
    assert "posix.system" in str(M._load_failure_reason(_capture_load_error(wrapped)))
    assert not marker.exists()


def _capture_load_error(path):
    try:
        M._safe_torch_load(path)
    except Exception as exc:
        return exc
    raise AssertionError("the unsafe file loaded")


def test_truncated_checkpoint_is_refused(tmp_path, net):
    good = tmp_path / "good.pt"
    M.save_checkpoint(good, net, labels=DEFAULT_LABELS, preprocessing=SMALL)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=f"^{bad} is not a covreport checkpoint: it cannot be loaded safely"):
        M.load_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match=f"^{junk} is not a covreport checkpoint"):
        M.load_checkpoint(junk)


def test_foreign_or_incomplete_dicts_are_refused(tmp_path, net):
    plain = tmp_path / "state.pt"
    torch.save(net.state_dict(), plain)
    with pytest.raises(ModelError) as info:
        M.load_checkpoint(plain)
    assert str(info.value).startswith(
        f"{plain} is not a covreport checkpoint (no 'format': 'covreport-checkpoint' marker; found a OrderedDict)")
    partial = tmp_path / "partial.pt"
    torch.save({"format": M.CHECKPOINT_FORMAT, "version": 1, "labels": ["A"]}, partial)
    with pytest.raises(ModelError, match=r"lacks the key\(s\) \['preprocessing', 'state_dict'\]"):
        M.load_checkpoint(partial)
    future = tmp_path / "future.pt"
    torch.save({"format": M.CHECKPOINT_FORMAT, "version": 99, "labels": ["A"], "preprocessing": {},
                "state_dict": {}}, future)
    with pytest.raises(ModelError, match="format version 99"):
        M.load_checkpoint(future)
    wrong = tmp_path / "wrong.pt"
    payload = torch.load(_save(tmp_path / "ok.pt", net), weights_only=True)
    payload["labels"] = ["A", "B"]
    torch.save(payload, wrong)
    with pytest.raises(ModelError, match=f"^Checkpoint {wrong} does not fit a DenseNet121 with 2 labels"):
        M.load_checkpoint(wrong)
    with pytest.raises(ModelError, match=f"^Weights file {tmp_path / 'absent.pt'} does not exist"):
        M.load_checkpoint(tmp_path / "absent.pt")


def _save(path, net):
    return M.save_checkpoint(path, net, labels=DEFAULT_LABELS, preprocessing=SMALL)


# --- where weights live -----------------------------------------------------------


def test_default_weights_picks_newest_kept_checkpoint(tmp_path, monkeypatch, net):
    monkeypatch.setenv(M.MODEL_DIR_ENV, str(tmp_path))
    assert M.default_weights() is None
    with pytest.raises(ModelError) as info:
        M.find_weights(None)
    msg = str(info.value)
    assert msg.startswith(f"No model weights given and none found in {tmp_path}. ")
    assert "`covreport train --chexpert-root DIR --out model/densenet121.pt`" in msg
    assert "xrv:densenet121-res224-chex" in msg

    old, new, epoch = tmp_path / "old.pt", tmp_path / "new.pth", tmp_path / "new.epoch3.pt"
    for i, p in enumerate((old, new, epoch)):
        p.write_bytes(b"x")
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "notes.txt").write_text("x")
    assert M.default_weights() == new
    assert M.find_weights(None) == new
    assert M.find_weights("xrv:densenet121-res224-chex") == "xrv:densenet121-res224-chex"
    assert M.find_weights(str(old)) == old


def test_default_model_dir_is_model_beside_cwd(tmp_path, monkeypatch, net):
    monkeypatch.delenv(M.MODEL_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert M.default_model_dir() == tmp_path / "model"
    (tmp_path / "model").mkdir()
    path = _save(tmp_path / "model" / "densenet121.pt", net)
    loaded = M.load_checkpoint(None)
    assert loaded.source == str(path)


# --- torchxrayvision ---------------------------------------------------------------


XRV_FILE = "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


def test_xrv_weights_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    pytest.importorskip("torchxrayvision")
    monkeypatch.setenv(M.MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError) as info:
        M.load_checkpoint("xrv:densenet121-res224-chex")
    msg = str(info.value)
    assert "are not on disk and covreport never downloads them" in msg
    assert str(tmp_path / "xrv" / XRV_FILE) in msg
    with pytest.raises(ModelError, match="Unknown torchxrayvision weights 'nope'"):
        M.load_checkpoint("xrv:nope")


@pytest.mark.parametrize("as_state_dict", [False, True])
def test_xrv_random_densenet_loads_through_the_same_api(tmp_path, monkeypatch, as_state_dict):
    xrv = pytest.importorskip("torchxrayvision")
    monkeypatch.setenv(M.MODEL_DIR_ENV, str(tmp_path))
    torch.manual_seed(3)
    base = xrv.models.DenseNet(weights=None).eval()
    with torch.no_grad():  # a non-zero bias so that row selection is visible
        base.classifier.bias.copy_(torch.arange(18, dtype=torch.float32))
    # torchxrayvision's release files pickle the whole module; a state dict is accepted too.
    (tmp_path / "xrv").mkdir()
    torch.save(base.state_dict() if as_state_dict else base, tmp_path / "xrv" / XRV_FILE)
    assert M.default_weights() is None  # the xrv subfolder is not scanned for covreport checkpoints
    loaded = M.load_checkpoint("xrv:densenet121-res224-chex")
    raw = xrv.models.model_urls["densenet121-res224-chex"]["labels"]
    keep = [i for i, name in enumerate(raw) if name]
    assert loaded.labels == tuple("Pleural Effusion" if raw[i] == "Effusion" else raw[i] for i in keep)
    assert loaded.preprocessing == Preprocessing(size=224, mean=(0.5,), std=(1 / 2048,), channels=1)
    assert loaded.sha256 == hashlib.sha256((tmp_path / "xrv" / XRV_FILE).read_bytes()).hexdigest()

    img = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    x = to_tensor(img, loaded.preprocessing)
    # Reference: torchxrayvision's own scaling of an 8-bit image to [-1024, 1024].
    ref_x = torch.from_numpy(xrv.utils.normalize(img * 255.0, 255))[None]
    torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-3)
    with torch.no_grad():
        feats, logits = M.features_and_logits(loaded, x[None])
        # Reference: torchxrayvision's features2 (ReLU + pool) and classifier.
        ref_feats = base.features2(x[None])
        ref_logits = base.classifier(ref_feats)[:, keep]
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)


# --- class activation maps -----------------------------------------------------------


def test_cam_of_densenet_has_image_shape_and_range(net):
    img = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    heat, overlay = M.class_activation_map(net, img, "Edema", labels=DEFAULT_LABELS, preprocessing=SMALL)
    assert heat.shape == (70, 90) and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0
    assert overlay.shape == (70, 90, 3) and overlay.dtype == np.uint8
    assert not net.training
    heat2, _ = M.class_activation_map(net, img, DEFAULT_LABELS.index("Edema"), labels=DEFAULT_LABELS,
                                      preprocessing=SMALL)
    np.testing.assert_array_equal(heat, heat2)
    with pytest.raises(ModelError, match="Unknown label 'Fracture'"):
        M.class_activation_map(net, img, "Fracture", labels=DEFAULT_LABELS, preprocessing=SMALL)


class _Probe(nn.Module):
    """Feature map 0 = the image, feature map 1 = its negative, 4x4 pooled."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        self.features = nn.Sequential(conv, nn.AvgPool2d(4))
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(2))
            self.classifier.bias.zero_()


def test_cam_highlights_the_region_that_drives_the_label():
    img = np.zeros((64, 64), dtype=np.float32)
    img[8:24, 40:56] = 1.0
    prep = Preprocessing(size=64, mean=(0.0,), std=(1.0,), channels=1)
    heat, overlay = M.class_activation_map(_Probe(), img, "bright", labels=("bright", "dark"), preprocessing=prep)
    inside = heat[10:22, 42:54]
    outside = heat[40:, :30]
    assert inside.min() > 0.9 and outside.max() < 0.05
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert 8 <= r < 24 and 40 <= c < 56
    # ReLU(-image) is zero everywhere: a flat map scales to all zeros.
    flat, _ = M.class_activation_map(_Probe(), img, "dark", labels=("bright", "dark"), preprocessing=prep)
    assert not flat.any()
    # alpha=0: the overlay is the grey image itself.
    _, grey = M.class_activation_map(_Probe(), img, "bright", labels=("bright", "dark"), preprocessing=prep,
                                     alpha=0.0)
    np.testing.assert_array_equal(grey, np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2))
    # the overlay is red (jet's top) where the map is 1 and blue (jet's bottom) where 0
    assert overlay[16, 48, 0] > overlay[16, 48, 2]
    assert overlay[50, 10, 2] > overlay[50, 10, 0]


def test_cam_accepts_a_loaded_model(tmp_path, net):
    path = _save(tmp_path / "m.pt", net)
    loaded = M.load_checkpoint(path)
    img = np.random.default_rng(1).random((40, 40)).astype(np.float32)
    heat, _ = M.class_activation_map(loaded, img, "Cardiomegaly")
    ref, _ = M.class_activation_map(net, img, "Cardiomegaly", labels=DEFAULT_LABELS, preprocessing=SMALL)
    np.testing.assert_array_equal(heat, ref)
    with pytest.raises(ModelError, match="needs the model's labels"):
        M.class_activation_map(net, img, 0)
