"""Reliability: weights files that are wrong, truncated, malicious or mislabelled are refused.

:func:`covreport.model.load_checkpoint` must raise :class:`ModelError` with a
clear message, and a pickle that would run code must not run it: each
malicious file is also loaded with plain ``pickle``/``torch.load(weights_only=False)``
afterwards, to prove its payload is live (the side effect then happens).
"""

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from covreport.cache import CacheKey, ScoreCache
from covreport.cli import main
from covreport.errors import ModelError
from covreport.model import CHECKPOINT_FORMAT, load_checkpoint
from covreport.scoring import score_images
from reliability_helpers import LABELS, write_png


class _RunsCode:
    """Unpickling this object runs ``exec(code)`` (the classic pickle attack)."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.code,))


def _payload(weights):
    return torch.load(weights, map_location="cpu", weights_only=True)


def _refused(path, *fragments):
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert str(path) in text
    for fragment in fragments:
        assert fragment in text, text
    return text


# --------------------------------------------------------------------------
# Not a checkpoint, or damaged


def test_wrong_files_are_refused(tmp_path, tiny_weights):
    rng = np.random.default_rng(0)
    png = write_png(tmp_path / "image.png", rng).rename(tmp_path / "image.pt")
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    npy = tmp_path / "array.pt"
    np.save(open(npy, "wb"), np.zeros(3))
    other_zip = tmp_path / "archive.pt"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("data.txt", "hello")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    plain_state = tmp_path / "state_dict.pt"
    torch.save(_payload(tiny_weights)["state_dict"], plain_state)
    for path in (png, text, empty, npy, other_zip):
        _refused(path, "is not a covreport checkpoint", "cannot be loaded safely")
    _refused(tensor, "is not a covreport checkpoint (no 'format': 'covreport-checkpoint' marker; found a Tensor)")
    _refused(plain_state, "is not a covreport checkpoint", "found a dict")
    _refused(tmp_path, "is a folder, not a checkpoint file")
    _refused(tmp_path / "missing.pt", "does not exist", "covreport train")


@pytest.mark.parametrize("fraction", [0.0001, 0.5, 0.999])
def test_truncated_checkpoint_is_refused(tmp_path, tiny_weights, fraction):
    data = Path(tiny_weights).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    text = _refused(cut, "cannot be loaded safely", "the file may be truncated")
    assert "Traceback" not in text


def test_flipped_bytes_in_weights_are_noticed_by_sha(tmp_path, tiny_weights):
    # A silently damaged tensor still loads (zip CRCs are not checked by torch),
    # but its SHA-256 differs, so the cache and the provenance never mix it up.
    data = bytearray(Path(tiny_weights).read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 100] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    try:
        loaded = load_checkpoint(damaged)
    except ModelError:
        return  # refused: fine too
    assert loaded.sha256 != load_checkpoint(tiny_weights).sha256


# --------------------------------------------------------------------------
# Code in a pickle


def _evil_files(folder, marker, tiny_weights):
    code = f"open({str(marker)!r}, 'w').write('code ran')"
    # A checkpoint's outline (the state dict is not needed to carry the payload).
    evil_checkpoint = {"format": CHECKPOINT_FORMAT, "version": 1, "arch": "densenet121",
                       "labels": list(LABELS), "preprocessing": {"size": 32}, "state_dict": {},
                       "metadata": {"note": _RunsCode(code)}}
    files = {}
    files["zip"] = folder / "evil_zip.pt"
    torch.save(evil_checkpoint, files["zip"])
    files["legacy"] = folder / "evil_legacy.pt"
    torch.save(evil_checkpoint, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"] = folder / "evil.pkl"
    files["pickle"].write_bytes(pickle.dumps(_RunsCode(code), protocol=2))
    return files


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path, tiny_weights, kind):
    marker = tmp_path / "PWNED"
    path = _evil_files(tmp_path, marker, tiny_weights)[kind]
    text = _refused(path, "cannot be loaded safely", "covreport never unpickles arbitrary objects")
    assert "exec" in text or "builtins" in text or "objects other than tensors" in text, text
    assert not marker.exists(), "loading the checkpoint ran code"
    # Through the CLI: `Error:`, exit 1, still no side effect.
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,first_image,second_image,outcome\nP1,a.png,b.png,Worse\n")
    result = CliRunner().invoke(main, ["score", str(manifest), "--weights", str(path),
                                       "--out", str(tmp_path / "s.csv"), "--no-cache", "--no-progress"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "s.csv").exists()
    # The payload is live: an unsafe load does run it (so the test above can fail).
    with open(path, "rb") as fh:
        if kind == "pickle":
            pickle.load(fh)
        else:
            torch.load(fh, map_location="cpu", weights_only=False)
    assert marker.read_text() == "code ran"


# --------------------------------------------------------------------------
# Labels and structure that do not match


def _variant(tmp_path, tiny_weights, name, **changes):
    payload = _payload(tiny_weights)
    payload.update(changes)
    path = tmp_path / f"{name}.pt"
    torch.save(payload, path)
    return path


def test_labels_that_do_not_match_the_weights_are_refused(tmp_path, tiny_weights):
    two = _variant(tmp_path, tiny_weights, "two", labels=list(LABELS[:2]))
    _refused(two, "does not fit a DenseNet121 with 2 labels")
    four = _variant(tmp_path, tiny_weights, "four", labels=list(LABELS) + ["Edema 2"])
    _refused(four, "does not fit a DenseNet121 with 4 labels")
    dup = _variant(tmp_path, tiny_weights, "dup", labels=["Edema", "Edema", "Cardiomegaly"])
    with pytest.raises(ModelError, match="invalid labels.*duplicated; labels must be distinct"):
        load_checkpoint(dup)
    _refused(_variant(tmp_path, tiny_weights, "nolabels", labels=[]), "invalid labels")
    _refused(_variant(tmp_path, tiny_weights, "numbers", labels=[1, 2, 3]), "invalid labels")


def test_other_structures_are_refused(tmp_path, tiny_weights):
    import torchvision

    resnet = _variant(tmp_path, tiny_weights, "resnet",
                      state_dict=torchvision.models.resnet18(weights=None).state_dict())
    _refused(resnet, "does not fit a DenseNet121")
    _refused(_variant(tmp_path, tiny_weights, "arch", arch="resnet18"), "holds a 'resnet18' model")
    _refused(_variant(tmp_path, tiny_weights, "newer", version=99), "format version 99", "Upgrade covreport")
    _refused(_variant(tmp_path, tiny_weights, "prep", preprocessing={"size": 4}), "invalid preprocessing")
    _refused(_variant(tmp_path, tiny_weights, "prep2", preprocessing={"size": 32, "colour": "red"}),
             "unknown preprocessing field(s) 'colour'")
    no_state = _payload(tiny_weights)
    del no_state["state_dict"]
    torch.save(no_state, tmp_path / "nostate.pt")
    _refused(tmp_path / "nostate.pt", "lacks the key(s) ['state_dict']")
    assert _payload(tiny_weights)["format"] == CHECKPOINT_FORMAT


def test_cached_scores_with_other_labels_are_not_reused(tmp_path, tiny_loaded):
    rng = np.random.default_rng(3)
    images = [write_png(tmp_path / f"i{k}.png", rng) for k in range(3)]
    fresh = score_images(images, tiny_loaded, num_workers=0)
    sig = tiny_loaded.preprocessing.signature()
    import hashlib

    with ScoreCache(tmp_path / "c.sqlite") as cache:
        rows = []
        for p in images:
            key = CacheKey(hashlib.sha256(p.read_bytes()).hexdigest(), tiny_loaded.sha256, sig)
            rows.append((key, ["Other A", "Other B", "Other C"], np.full(3, 0.5), np.zeros(1024)))
        cache.put_many(rows)  # same key, other labels: a stale or foreign entry
        res = score_images(images, tiny_loaded, cache=cache, num_workers=0)
    assert (res.from_cache, res.scored) == (0, 3)
    np.testing.assert_array_equal(res.scores[list(LABELS)].to_numpy(), fresh.scores[list(LABELS)].to_numpy())


def test_label_mismatch_message_names_the_tensor(tmp_path, tiny_weights):
    two = _variant(tmp_path, tiny_weights, "two", labels=list(LABELS[:2]))
    _refused(two, "classifier.weight", "[3, 1024]")
