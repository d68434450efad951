"""The report's number styles (issue 20 section 8): radiology (default) and vancouver.

Reference for the radiology style: Radiology's instructions for authors and
the AMA Manual of Style, 11th ed., section 20.9: "P = .006", "P < .001",
"P > .99", no leading zero, two decimals from .01 on and three below (never
rounding a P below .05 up to .05); "95% CI: 0.87, 0.99"; "100% (44 of 44)";
the minus sign U+2212. The expected strings below are written by hand from
those rules, not produced by the code under test.
"""

import html
import json
import re
from pathlib import Path

import pytest

from covreport.report import format as f
from covreport.report import render_html, report_style
from report_fixtures import with_contract_keys

MINUS = "\u2212"


@pytest.mark.parametrize("p, radiology, vancouver", [
    (0.0004, "<.001", "<0.001"),
    (0.006, ".006", "0.0060"),
    (0.0123, ".01", "0.012"),
    (0.043, ".04", "0.043"),
    (0.0496, ".0496", "0.050"),  # .05 only when P is at least .05 (AMA 20.9: "P = .049", never ".05")
    (0.0451, ".045", "0.045"),  # rounds to .05 at two decimals, so three
    (0.0518, ".052", "0.052"),  # from above too: ".05" would hide which side of .05 it lies (reviewer, issue 20)
    (0.05, ".05", "0.050"),
    (0.0551, ".06", "0.055"),
    (0.24, ".24", "0.24"),
    (0.995, ">.99", "0.99"),
    (1.0, ">.99", "1.0"),
    (float("nan"), "n/a", "n/a"),
])
def test_p_values(p, radiology, vancouver):
    with f.use_style("radiology"):
        assert f.fmt_p(p) == radiology
    with f.use_style("vancouver"):
        assert f.fmt_p(p) == vancouver


def test_p_in_a_sentence():
    with f.use_style("radiology"):
        assert [f.fmt_pp(p) for p in (0.006, 0.0001, 0.999)] == ["P = .006", "P < .001", "P > .99"]
        assert f.fmt_p_below(0.05) == "P < .05"
    with f.use_style("vancouver"):
        assert [f.fmt_pp(p) for p in (0.006, 0.0001)] == ["p = 0.0060", "p < 0.001"]
        assert f.fmt_p_below(0.05) == "p < 0.05"


def test_intervals_estimates_and_proportions():
    rec = {"estimate": 0.9365, "ci_low": 0.871, "ci_high": 0.9912}
    neg = {"estimate": -0.21, "ci_low": -0.95, "ci_high": 0.534}
    with f.use_style("radiology"):
        assert f.fmt_ci(0.871, 0.9912, 2) == "0.87, 0.99"
        assert f.fmt_est(rec, 2) == "0.94 (0.87, 0.99)"
        assert f.fmt_est_text(rec, 2) == "0.94 (95% CI: 0.87, 0.99)"
        assert f.fmt_est(neg, 2) == f"{MINUS}0.21 ({MINUS}0.95, 0.53)"
        assert f.fmt_prop_text({"estimate": 1.0, "ci_low": 0.9196, "ci_high": 1.0}, 44, 44) == \
            "100% (44 of 44; 95% CI: 92%, 100%)"
        assert f.fmt_num(-3) == f"{MINUS}3" and f.fmt_num(-0.0001, 3) == "0.000"  # no negative zero
        assert f.fmt_signed(-0.03) == f"{MINUS}0.030" and f.fmt_signed(0.012) == "+0.012"
    with f.use_style("vancouver"):
        assert f.fmt_est(rec, 2) == "0.94 (0.87\u20130.99)"
        assert f.fmt_est_text(rec, 2) == f.fmt_est(rec, 2)
        assert f.fmt_est(neg, 2) == "-0.21 (-0.95 to 0.53)"
        assert f.fmt_prop_text({"estimate": 1.0, "ci_low": 0.9196, "ci_high": 1.0}, 44, 44) == "1.000 (0.920\u20131.000)"


def test_counts_and_thousands_in_every_style():
    for style in f.STYLES:
        with f.use_style(style):
            assert f.fmt_count(5.0) == "5" and f.fmt_count(3.5) == "3.5" and f.fmt_count(1024.0) == "1,024"
            assert f.fmt_num(12345) == "12,345" and f.fmt_pct(1234, 2000) == "1,234 (61.7%)"


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="unknown report style 'ama'; choose one of radiology, vancouver"):
        with f.use_style("ama"):
            pass


def test_italic_p_only_in_text():
    page = ('<html><head><title>P = .01</title><style>p::after{content:"P = .5"}</style></head>'
            '<body><p title="P = .2">Holm-adjusted P = .03 and P &lt; .001; APP = .1; a P of .2</p></body></html>')
    with f.use_style("radiology"):
        out = f.italic_p(page)
    assert out.count("<i>P</i>") == 2
    assert '<title>P = .01</title>' in out and 'title="P = .2"' in out and 'content:"P = .5"' in out
    with f.use_style("vancouver"):
        assert f.italic_p(page) == page


def _text(page):
    page = re.sub(r"<(style|title)[^>]*>.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def _styled(style):
    results = with_contract_keys()
    if style is not None:
        results["provenance"].setdefault("report_options", {})["style"] = style
    return results


def test_radiology_report_has_no_vancouver_numbers():
    results = _styled("radiology")
    page = render_html(results)
    text = _text(page)
    assert "<i>P</i> = ." in page or "<i>P</i> &lt; ." in page
    body = re.sub(r"Appendix E\..*", "", text, flags=re.S)  # method strings as recorded keep their own text
    # No p-value with a leading zero, no en-dash interval of decimals, no hyphen-minus before a number.
    assert not re.search(r"\b[pP] [=<>] 0\.\d", body), re.search(r".{60}\b[pP] [=<>] 0\.\d.{20}", body)
    assert not re.search(r"\(\d\.\d+\u2013\d\.\d+\)", body), re.search(r".{60}\(\d\.\d+\u2013\d\.\d+\).{10}", body)
    assert not re.search(r"(?<![\w)\]-])-\d*\.\d", body), re.search(r".{60}(?<![\w)\]-])-\d*\.\d.{10}", body)
    # The same numbers as Table 4's cells, in the style: sensitivity 1.000 (0.920-1.000) of the fixture.
    sens = results["prediction"]["nested"]["metrics"]["sensitivity"]
    with f.use_style("radiology"):
        assert f.fmt_est(sens) in text


def test_style_recorded_and_missing_means_vancouver():
    assert report_style(_styled(None)) == "vancouver"  # written before styles: rendered as it was
    assert report_style(_styled("radiology")) == "radiology"
    text = _text(render_html(_styled("vancouver")))
    assert re.search(r"\bp [=<] 0\.\d", text)
    assert "95% CI: " not in text


def test_run_records_the_style(tmp_path):
    from click.testing import CliRunner

    from covreport.cli import main

    ex = Path(__file__).resolve().parents[1] / "data_manifests" / "reviewer_example"
    runner = CliRunner()
    for style in (None, "vancouver"):
        out = tmp_path / (style or "default")
        args = ["run", f"{ex}/manifest.csv", "--scores", f"{ex}/scores.csv", "--permutations", "0",
                "--bootstrap", "0", "--no-pdf", "--protocol", "global", "--out", str(out)]
        res = runner.invoke(main, args + (["--style", style] if style else []))
        assert res.exit_code == 0, res.output
        recorded = json.loads((out / "results.json").read_text())["provenance"]["report_options"]["style"]
        assert recorded == (style or "radiology")
        page = (out / "report.html").read_text()
        assert ("<i>P</i>" in page) == (style is None)


def test_cli_choices_are_the_styles():
    from covreport.cli import run

    opt = next(p for p in run.params if p.name == "style")
    assert tuple(opt.type.choices) == f.STYLES and opt.default == f.STYLES[0]


def test_a_hostile_style_is_an_error_naming_the_field():
    from covreport.errors import ReportError

    with pytest.raises(ReportError, match=r"provenance.report_options.style is '<script>'; it must be one of "
                                          r"radiology, vancouver \(covreport run --style\)"):
        render_html(_styled("<script>"))


def test_halves_round_up_and_small_bounds_are_not_printed_as_zero():
    # AMA 11th ed. 20.9 / Radiology: round half up (Python's format rounds an exact half to even: 62.5 -> 62).
    with f.use_style("radiology"):
        assert f.fmt_pct(5, 8) == "5 (63%)" and f.fmt_pct(3, 8) == "3 (38%)"
        assert f.fmt_prop_text({"estimate": 0.625, "ci_low": 0.245, "ci_high": 0.915}, 5, 8) == \
            "63% (5 of 8; 95% CI: 25%, 92%)"
        # a lower limit of 0.0037 is not "0.00" (reviewer, issue 20); a true 0 stays 0.00
        assert f.fmt_ci(0.0037, 0.18, 2) == "0.004, 0.18" and f.fmt_ci(0.0, 0.5, 2) == "0.00, 0.50"
        assert f.fmt_ci(-0.004, 0.2, 2) == MINUS + "0.004, 0.20"
        # ... but a bound that is zero at 3 more decimals too is printed as zero (the site demo's prediction
        # interval for the AUC started at 3e-7, printed "0.000000")
        assert f.fmt_ci(3e-7, 0.9999997, 3) == "0.000, 1.000" and f.fmt_ci(0.00004, 0.5, 3) == "0.00004, 0.500"
