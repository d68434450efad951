"""Tests of covreport.scoring (batched, cached scoring), covreport._io and `covreport score`.

A randomly initialised DenseNet121 at 32x32 input keeps this fast. The
independent reference for the outputs is the network run the plain way:
float32, default memory layout, one image at a time under ``torch.no_grad``,
with the pooled features computed here from ``model.features`` directly
(``ReLU`` -> global mean), not through covreport's ``features_and_logits``.
"""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from covreport._io import safe_csv_cell, unescape_csv_cell, write_csv_atomic
from covreport.cache import ScoreCache
from covreport.cli import main
from covreport.constants import feature_columns
from covreport.errors import ModelError, ScoresError
from covreport.images import Preprocessing, load_image, to_tensor
from covreport.model import build_model, load_checkpoint, save_checkpoint
from covreport.scores_file import read_scores, write_scores
from covreport.scoring import score_images, score_manifest

LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(LABELS)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(path, model, labels=LABELS, preprocessing=Preprocessing(size=32))
    return path


@pytest.fixture(scope="module")
def loaded(weights):
    return load_checkpoint(weights)


def _images(folder, n=6, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"cxr_{i}.png"
        Image.fromarray(rng.integers(0, 256, (72 + i, 80), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def reference_model(weights):
    return load_checkpoint(weights).model.eval()  # never given to the scorer


def _reference(model, preprocessing, path):
    x = to_tensor(load_image(path), preprocessing)[None]
    with torch.no_grad():
        fmap = torch.relu(model.features(x))
        feats = fmap.mean(dim=(2, 3))
        probs = torch.sigmoid(model.classifier(feats))
    return probs[0].numpy(), feats[0].numpy()


def test_scores_match_plain_reference_and_layout(tmp_path, loaded, reference_model):
    paths = _images(tmp_path / "img", n=3)
    res = score_images(paths, loaded, batch_size=2, num_workers=0)
    assert list(res.scores.columns) == ["image", *LABELS, *feature_columns()]
    assert list(res.scores["image"]) == [str(p) for p in paths]
    assert res.scored == 3 and res.from_cache == 0 and res.failed == {}
    for i, p in enumerate(paths):
        probs, feats = _reference(reference_model, loaded.preprocessing, p)
        np.testing.assert_allclose(res.scores.loc[i, list(LABELS)].to_numpy(float), probs, atol=1e-5)
        np.testing.assert_allclose(res.scores.loc[i, feature_columns()].to_numpy(float), feats,
                                   rtol=1e-4, atol=1e-5)
    assert res.scores[feature_columns()].dtypes.unique().tolist() == [np.float32]


def test_workers_and_bad_images_and_duplicates(tmp_path, loaded):
    paths = _images(tmp_path / "img", n=4)
    (tmp_path / "img" / "text.png").write_text("not an image")
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    shutil.copy(paths[0], tmp_path / "img" / "copy_of_0.png")
    images = {
        "a.png": paths[0], "b.png": paths[1], "c.png": paths[2], "d.png": paths[3],
        "text.png": tmp_path / "img" / "text.png", "empty.png": tmp_path / "img" / "empty.png",
        "missing.png": tmp_path / "img" / "missing.png",
        "copy.png": tmp_path / "img" / "copy_of_0.png",
    }
    res = score_images(images, loaded, batch_size=1, num_workers=2)  # 5 batches: 2 workers
    assert list(res.scores["image"]) == ["a.png", "b.png", "c.png", "d.png", "copy.png"]
    assert res.failed == {
        "text.png": "not a recognised image format (PNG, JPEG or DICOM expected)",
        "empty.png": "empty file", "missing.png": "file not found",
    }
    assert res.scored == 4  # the copy has the same bytes: run once
    a = res.scores.set_index("image")
    np.testing.assert_array_equal(a.loc["a.png"].to_numpy(), a.loc["copy.png"].to_numpy())
    # Same numbers without worker processes (oneDNN may differ in the last bits).
    res0 = score_images(images, loaded, batch_size=2, num_workers=0)
    np.testing.assert_allclose(res0.scores.iloc[:, 1:].to_numpy(float),
                               res.scores.iloc[:, 1:].to_numpy(float), atol=1e-5)


def test_second_run_all_from_cache_identical(tmp_path, loaded):
    paths = _images(tmp_path / "img", n=3)
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        first = score_images(paths, loaded, cache=cache, batch_size=2, num_workers=0)
        second = score_images(paths, loaded, cache=cache, batch_size=4, num_workers=0)
        assert (first.scored, first.from_cache) == (3, 0)
        assert (second.scored, second.from_cache) == (0, 3)
        pd.testing.assert_frame_equal(first.scores, second.scores)
        # Renaming keeps the entry (content key); changing pixels misses it.
        paths[0].rename(tmp_path / "img" / "renamed.png")
        Image.fromarray(np.zeros((70, 70), np.uint8)).save(paths[1])
        third = score_images([tmp_path / "img" / "renamed.png", paths[1]], loaded, cache=cache,
                             num_workers=0)
        assert (third.scored, third.from_cache) == (1, 1)
        np.testing.assert_array_equal(third.scores.iloc[0, 1:].to_numpy(),
                                      first.scores.iloc[0, 1:].to_numpy())


def test_interrupted_run_resumes_from_cache(tmp_path, loaded, monkeypatch):
    import covreport.inference as inference

    paths = _images(tmp_path / "img", n=5)
    real = inference._forward
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during batch 2
        return real(*args, **kwargs)

    with ScoreCache(tmp_path / "c.sqlite") as cache:
        monkeypatch.setattr(inference, "_forward", failing)
        with pytest.raises(KeyboardInterrupt):
            score_images(paths, loaded, cache=cache, batch_size=2, num_workers=0)
        monkeypatch.setattr(inference, "_forward", real)
        assert len(cache) == 2  # batch 1 was committed
        resumed = score_images(paths, loaded, cache=cache, batch_size=2, num_workers=0)
    assert (resumed.scored, resumed.from_cache) == (3, 2)
    clean = score_images(paths, loaded, batch_size=2, num_workers=0)
    np.testing.assert_allclose(resumed.scores.iloc[:, 1:].to_numpy(float),
                               clean.scores.iloc[:, 1:].to_numpy(float), atol=1e-6)


def test_worker_failure_falls_back_to_main_process(tmp_path, loaded, monkeypatch):
    import torch.utils.data as tud

    paths = _images(tmp_path / "img", n=4)
    real = tud.DataLoader

    class Broken(real):
        """Workers deliver one batch, then die (as with a too small /dev/shm)."""

        def __iter__(self):
            inner = super().__iter__()
            if self.num_workers == 0:
                return inner

            def gen():
                yield next(inner)
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Bus error.")
            return gen()

    monkeypatch.setattr(tud, "DataLoader", Broken)
    with pytest.warns(RuntimeWarning, match="scoring the remaining images in the main process"):
        res = score_images(paths, loaded, batch_size=1, num_workers=2)
    assert res.scored == 4 and list(res.scores["image"]) == [str(p) for p in paths]
    monkeypatch.setattr(tud, "DataLoader", real)
    clean = score_images(paths, loaded, batch_size=1, num_workers=0)
    np.testing.assert_allclose(res.scores.iloc[:, 1:].to_numpy(float),
                               clean.scores.iloc[:, 1:].to_numpy(float), atol=1e-5)


def test_bf16_close_to_float32(tmp_path, loaded):
    paths = _images(tmp_path / "img", n=2)
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        f32 = score_images(paths, loaded, cache=cache, batch_size=4, num_workers=0)
        bf16 = score_images(paths, loaded, cache=cache, batch_size=4, num_workers=0, precision="bf16")
        # bf16 outputs are cached apart from float32 ones: never mixed.
        assert (bf16.scored, bf16.from_cache) == (2, 0)
        again = score_images(paths, loaded, cache=cache, num_workers=0, precision="bfloat16")
        assert (again.scored, again.from_cache) == (0, 2)
        pd.testing.assert_frame_equal(again.scores, bf16.scores)
    assert bf16.precision == "bf16"
    dev = np.abs(bf16.scores[list(LABELS)].to_numpy() - f32.scores[list(LABELS)].to_numpy()).max()
    assert dev <= 0.02
    with pytest.raises(ModelError, match="precision must be one of"):
        score_images(paths, loaded, precision="fp8")


def _manifest(tmp_path):
    img = tmp_path / "img"
    paths = _images(img, n=5)
    (img / "bad.png").write_text("<html>not an image</html>")
    shutil.copy(paths[0], img / "=cmd.png")
    text = ("patient_id,first_image,second_image,outcome\n"
            "p1,img/cxr_0.png,img/cxr_1.png,Worse\n"
            "p1,img/cxr_1.png,img/cxr_2.png,Stable\n"
            "p2,img/cxr_3.png,img/bad.png,Improved\n"
            "p3,img/=cmd.png,img/cxr_4.png,Worse\n")
    (tmp_path / "manifest.csv").write_text(text)
    return tmp_path / "manifest.csv"


def test_score_manifest_keys_as_written(tmp_path, loaded):
    from covreport.manifest import read_manifest

    m = read_manifest(_manifest(tmp_path), check_images=False)
    res = score_manifest(m, loaded, cache_path=tmp_path / "c.sqlite", num_workers=0)
    assert list(res.scores["image"]) == ["img/cxr_0.png", "img/cxr_1.png", "img/cxr_2.png",
                                         "img/cxr_3.png", "img/=cmd.png", "img/cxr_4.png"]
    assert res.failed == {"img/bad.png": "not a recognised image format (PNG, JPEG or DICOM expected)"}
    assert res.scored == 5  # =cmd.png is a copy of cxr_0.png
    again = score_manifest(m, loaded, cache_path=tmp_path / "c.sqlite", num_workers=0)
    assert (again.scored, again.from_cache) == (0, 5)
    pd.testing.assert_frame_equal(again.scores, res.scores)


# --------------------------------------------------------------------------
# Scores files and CSV safety
# --------------------------------------------------------------------------


def _scores_frame(n=3):
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"image": [f"img/{i}.png" for i in range(n)]})
    for lab in LABELS:
        df[lab] = rng.random(n, dtype=np.float32).astype(np.float64)
    feats = pd.DataFrame(rng.standard_normal((n, 1024)).astype(np.float32), columns=feature_columns())
    return pd.concat([df, feats], axis=1)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_scores_file_round_trip_exact(tmp_path, suffix):
    df = _scores_frame()
    df.loc[0, "image"] = "=HYPERLINK(\"http://x\",\"y\")"
    write_scores(df, tmp_path / f"s{suffix}", metadata={"weights_sha256": "ab" * 32})
    back = read_scores(tmp_path / f"s{suffix}", require_features=True)
    assert list(back["image"]) == list(df["image"])
    np.testing.assert_array_equal(back[list(LABELS)].to_numpy(), df[list(LABELS)].to_numpy())
    np.testing.assert_array_equal(back[feature_columns()].to_numpy(), df[feature_columns()].to_numpy())
    assert (tmp_path / f"s{suffix}.json").read_text().count("ab" * 32) == 1
    if suffix == ".csv":
        text = (tmp_path / "s.csv").read_text()
        assert "'=HYPERLINK" in text and "\n=HYPERLINK" not in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_read_scores_errors_name_file_and_columns(tmp_path):
    df = _scores_frame()
    p = tmp_path / "s.csv"
    write_scores(df.drop(columns=["Edema"]), p)
    with pytest.raises(ScoresError) as info:
        read_scores(p, labels=LABELS)
    assert str(info.value) == f"scores file {p} is missing label column(s): Edema"
    write_scores(df.drop(columns=["feat_0007"]), p)
    with pytest.raises(ScoresError, match=r"missing 1 feature column\(s\): feat_0007"):
        read_scores(p)
    bad = df.copy()
    bad.loc[1, "Edema"] = 1.5
    write_scores(bad, p)
    with pytest.raises(ScoresError, match=r"line 3, column 'Edema': 1.5 is not a probability"):
        read_scores(p)
    dup = df.copy()
    dup.loc[2, "image"] = dup.loc[0, "image"]
    write_scores(dup, p)
    with pytest.raises(ScoresError, match="appears more than once"):
        read_scores(p)
    with pytest.raises(ScoresError, match="must end in .csv or .parquet"):
        write_scores(df, tmp_path / "s.xlsx")
    with pytest.raises(ScoresError, match="does not exist"):
        read_scores(tmp_path / "nope.csv")
    (tmp_path / "noimage.csv").write_text("Edema\n0.5\n")
    with pytest.raises(ScoresError, match="has no 'image' column"):
        read_scores(tmp_path / "noimage.csv")


def test_safe_csv_cell_and_inverse():
    # OWASP CSV injection: cells starting with = + - @ tab CR are prefixed with '
    cases = {"=1+2": "'=1+2", "+cmd": "'+cmd", "-x": "'-x", "@SUM(A1)": "'@SUM(A1)",
             "\tx": "'\tx", "\rx": "'\rx", "plain": "plain", "-1.5": "-1.5", "+3": "+3",
             "'=x": "''=x", "": ""}
    for raw, safe in cases.items():
        assert safe_csv_cell(raw) == safe
        assert unescape_csv_cell(safe) == raw
    assert safe_csv_cell(-3) == -3


def test_write_csv_atomic_neutralises_text_not_numbers(tmp_path):
    df = pd.DataFrame({"name": ["=HYPERLINK(\"http://evil\")", "ok", "@x"], "value": [-1.0, 2.0, 3.5],
                       "=col": ["a", "b", "c"]})
    write_csv_atomic(df, tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "name,value,'=col"
    assert lines[1] == "\"'=HYPERLINK(\"\"http://evil\"\")\",-1.0,a"
    assert lines[3] == "'@x,3.5,c"


# --------------------------------------------------------------------------
# covreport score
# --------------------------------------------------------------------------


def test_cli_score_twice_second_all_from_cache(tmp_path, weights):
    manifest = _manifest(tmp_path)
    runner = CliRunner()
    args = ["score", str(manifest), "--weights", str(weights), "--cache", str(tmp_path / "c.sqlite"),
            "--workers", "0", "--no-progress"]
    r1 = runner.invoke(main, [*args, "--out", str(tmp_path / "s1.csv")])
    assert r1.exit_code == 0, r1.output
    assert "Scored      5 (distinct images run through the network, float32)" in r1.output
    assert "From cache  0" in r1.output
    assert "Failed      1\n  img/bad.png: not a recognised image format" in r1.output
    r2 = runner.invoke(main, [*args, "--out", str(tmp_path / "s2.csv")])
    assert r2.exit_code == 0, r2.output
    assert "Scored      0 " in r2.output and "From cache  5" in r2.output
    assert (tmp_path / "s1.csv").read_bytes() == (tmp_path / "s2.csv").read_bytes()
    scores = read_scores(tmp_path / "s2.csv", labels=LABELS, require_features=True)
    assert "img/=cmd.png" in set(scores["image"])


def test_cli_score_errors(tmp_path, weights):
    manifest = _manifest(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["score", str(manifest), "--weights", str(weights), "--out",
                             str(tmp_path / "s.csv"), "--cache", "c.sqlite", "--no-cache"])
    assert r.exit_code == 2 and "give --cache or --no-cache, not both" in r.output
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"junk" * 1000)
    r = runner.invoke(main, ["score", str(manifest), "--weights", str(weights), "--out",
                             str(tmp_path / "s.csv"), "--cache", str(corrupt), "--workers", "0"])
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: score cache {corrupt} is corrupt or not a covreport cache")
    assert not (tmp_path / "s.csv").exists()
    r = runner.invoke(main, ["score", str(manifest), "--weights", str(weights), "--out",
                             str(tmp_path / "s.csv"), "--no-cache", "--workers", "0", "--strict"])
    assert r.exit_code == 1 and r.output.startswith("Error: ")
    assert not (tmp_path / "s.csv").exists()


def test_hashing_many_files_in_threads(tmp_path):
    import hashlib

    from covreport.scoring import _hash_all

    paths = []
    signature = b"\x89PNG\r\n\x1a\n"  # files are hashed only after their magic bytes are checked
    for i in range(70):  # above the threading threshold
        p = tmp_path / f"f{i}.png"
        p.write_bytes(signature + bytes([i]) * (i + 1))
        paths.append(p)
    paths.append(tmp_path / "missing.png")
    (tmp_path / "text.png").write_bytes(b"not an image")
    paths.append(tmp_path / "text.png")
    got = _hash_all(paths)
    # Reference: hashlib on the bytes written, in order.
    assert got[:70] == [hashlib.sha256(signature + bytes([i]) * (i + 1)).hexdigest() for i in range(70)]
    assert got[70].reason == "file not found"
    assert got[71].reason == "not a recognised image format (PNG, JPEG or DICOM expected)"


def test_inference_copy_folds_batchnorm_and_leaves_the_model_alone(weights):
    from covreport.model import features_and_logits
    from covreport.inference import _prepare_model

    fresh = load_checkpoint(weights)
    model = fresh.model.eval()
    # Non-trivial BatchNorm statistics, so folding is really exercised.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    copy_ = _prepare_model(fresh)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    n_bn_copy = sum(isinstance(m, torch.nn.BatchNorm2d) for m in copy_.modules())
    assert n_bn_copy == n_bn - 59  # norm0 + the 58 dense layers' norm2 folded
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref_f, ref_l = features_and_logits(model, x)  # reference: the unfolded network
        f, logits = features_and_logits(copy_, x.contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(f.numpy(), ref_f.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits.numpy(), ref_l.numpy(), rtol=1e-4, atol=1e-5)
    # The caller's model is untouched: same parameter objects, values, layout, modules.
    assert [id(p) for p in model.parameters()] == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k
    assert model.training is False and n_bn == 1 + 58 * 2 + 3 + 1


def test_cli_score_writes_nothing_when_no_image_can_be_scored(tmp_path, weights):
    (tmp_path / "m.csv").write_text("patient_id,first_image,second_image,outcome\nP1,a.png,b.png,Worse\n")
    r = CliRunner().invoke(main, ["-q", "score", str(tmp_path / "m.csv"), "--weights", str(weights),
                                  "--out", str(tmp_path / "s.csv")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: none of the 2 image(s) could be scored, e.g. ")
    assert not (tmp_path / "s.csv").exists()
