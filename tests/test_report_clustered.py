"""The primary clustered table, its Methods and the mixed model's results sentence (issue 20, second review).

What is checked: the patient-clustered table shows the difference of medians with its percentile
cluster-bootstrap CI and no Hedges' g (whose BCa interval undercovers with few patients in a group,
benchmarks/bench_clustered_few.py); the Methods name the Welch-Satterthwaite df and the simulated size
and coverage; the mixed model's sentence counts what Table 2c shows; the penalty C prints with two
significant figures.
"""

import html
import re

from covreport.report import render_html
from covreport.report.format import fmt_est, fmt_sig, use_style
from covreport.report.summaries import endpoint_summary, mixed_summary
from covreport.stats.clustered import SIMULATION_CHECK
from report_fixtures import with_contract_keys


def _results():
    results = with_contract_keys()
    results["provenance"].setdefault("report_options", {})["style"] = "radiology"
    for r in results["group_differences_clustered"]:
        r.setdefault("df", 12.5)
        r.setdefault("p_method", "cluster permutation, 9,999 Monte Carlo permutations")
    return results


def _text(page):
    return html.unescape(re.sub(r"<[^>]+>", " ", page)).replace("\u00a0", " ")


def _table(page, table_id):
    start = page.index(f'id="{table_id}"')
    return page[start:page.index("</div>", page.index("</table>", start))]


def test_the_clustered_table_shows_the_difference_of_medians_and_not_g():
    results = _results()
    page = render_html(results)
    table = _text(_table(page, "table-groups-clustered"))
    assert "Difference of medians" in table and "Hedges' g, bootstrap CI" not in table
    assert f"covered {SIMULATION_CHECK['g_bca']} in simulations" in re.sub(r"\s+", " ", table)
    assert "not a test of theta" in table
    # the cell is the record's median difference with its CI
    row = results["group_differences_clustered"][0]
    rec = next(b for b in results["bootstrap"]["group_differences"] if b["quantity"] == "median_difference"
               and (b["contrast"], b["label"]) == (row["contrast"], row["label"]))
    with use_style("radiology"):
        assert fmt_est(rec, 3) in table


def test_methods_name_the_df_and_the_simulated_size_and_coverage():
    text = re.sub(r"\s+", " ", _text(render_html(_results())))
    assert "Welch-Satterthwaite degrees of freedom" in text
    assert (f"rejected a true null hypothesis in {SIMULATION_CHECK['size']} of studies at the 5% level and "
            f"the interval of theta covered the true value in {SIMULATION_CHECK['coverage']}") in text


def _mixed(label, p, tau2=0.01):
    return {"label": label, "contrast": "Worse vs Improved", "p": p, "random_effect_variance": tau2,
            "residual_variance": 0.02}


def test_mixed_summary_counts_the_primary_contrast():
    boundary = 0.0      # a patient variance at the boundary (mixed.BOUNDARY times the residual variance, or less)
    results = {"mixed_model": [_mixed("A", 0.001, boundary), _mixed("B", 0.03), _mixed("C", 0.4, boundary),
                               {**_mixed("A", 0.0001), "contrast": "Worse vs Stable"}]}
    endpoint = {"contrast": "Worse vs Improved", "primary": {"holm_rows": [{"label": "A"}, {"label": "C"}]}}
    got = mixed_summary(results, endpoint)
    assert got["labels"] == ["A", "B", "C"] and got["significant"] == ["A", "B"]
    assert got["only_mixed"] == ["B"] and got["only_primary"] == ["C"] and got["boundary"] == ["A", "C"]
    assert mixed_summary({"mixed_model": []}, endpoint) is None


def test_the_mixed_model_sentence_is_rendered_from_the_summary():
    results = _results()
    view = mixed_summary(results, endpoint_summary(results))
    text = re.sub(r"\s+", " ", _text(render_html(results)))
    assert (f"the mean change differed at P < .05 for {len(view['significant'])} of the "
            f"{len(view['labels'])} labels") in text


def test_penalty_values_print_with_two_significant_figures():
    assert [fmt_sig(x) for x in (0.2154, 100.0, 0.0001, 0.0022, 0.01, -0.5)] == \
        ["0.22", "100", "0.0001", "0.0022", "0.01", "\u22120.5"]
