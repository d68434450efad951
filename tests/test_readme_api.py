"""The README's "Python API" section runs as written, and ``import covreport`` stays light (issue 21.7)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import covreport

ROOT = Path(__file__).resolve().parent.parent


def _api_block():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one python block"
    return blocks[0]


def test_readme_python_api_block_runs(tmp_path, monkeypatch, capsys):
    # The block as written, from a folder holding data_manifests/ (as a checkout's root does).
    (tmp_path / "data_manifests").symlink_to(ROOT / "data_manifests", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(_api_block(), "README.md (Python API)", "exec"), {"__name__": "readme_api"})
    out = capsys.readouterr().out.splitlines()
    results = json.loads((tmp_path / "api-report" / "results.json").read_text(encoding="utf-8"))
    flow = results["flow"]
    assert out[0] == f"{flow['pairs_in_manifest']} pairs of {flow['patients_in_manifest']} patients"
    head = results["prediction"]["headline"]
    assert out[1].startswith(f"{head} AUC ")  # the headline protocol named by results.json
    assert results["provenance"]["options"]["permutations"] == 0
    assert not (tmp_path / "api-report" / "report.pdf").exists()
    # the 2x2 table printed: sensitivity 40/44 (reference: the fraction itself)
    assert any(line.split()[1:3] == ["sensitivity", f"{40 / 44:.6f}"] for line in out)


def test_import_covreport_loads_nothing_heavy():
    code = ("import sys, covreport; heavy = [m for m in ('torch', 'matplotlib', 'numpy', 'pandas', 'scipy') "
            "if m in sys.modules]; print(heavy, covreport.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"[] {covreport.__version__}"


@pytest.mark.parametrize("name, module, attr", [
    ("read_manifest", "covreport.manifest", "read_manifest"),
    ("score", "covreport.scoring", "score_to_file"),
    ("summarise", "covreport.summary", "summarise"),
    ("diagnostic_metrics", "covreport.stats", "diagnostic_metrics"),
    ("delong_auc", "covreport.stats", "delong_auc"),
    ("obuchowski_auc", "covreport.stats", "obuchowski_auc"),
    ("compare_groups", "covreport.stats", "compare_groups"),
    ("predict_outcome", "covreport.stats", "predict_outcome"),
])
def test_top_level_names_are_the_library_functions_with_numpydoc(name, module, attr):
    import importlib

    value = getattr(covreport, name)
    assert value is getattr(importlib.import_module(module), attr)
    assert name in covreport.__all__ and name in dir(covreport)
    assert "Parameters\n" in value.__doc__ or "Returns\n" in value.__doc__
    assert "Parameters\n    ----------" in covreport.run.__doc__


def test_verify_is_both_the_function_and_the_module():
    from covreport.verify import VerifyError, verify

    assert callable(covreport.verify) and covreport.verify.VerifyError is VerifyError
    assert covreport.verify.verify is verify
    import covreport.verify as module  # the import system's attribute does not replace it

    assert module is covreport.verify and callable(covreport.verify)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        covreport.nope  # noqa: B018


def test_run_takes_a_runoptions_alone(tmp_path):
    with pytest.raises(TypeError, match="RunOptions alone"):
        covreport.run(covreport.RunOptions(manifest=tmp_path / "m.csv", out=tmp_path / "o"), permutations=0)
