"""Issue 20.6: Table 1 shows standardised differences, and baseline p-values only with --table1-tests."""

import re

from covreport.report import render_html
from covreport.report.format import fmt_num, fmt_pct
from report_fixtures import base


def _table(html, table_id):
    return html[html.index(f'id="{table_id}"'):html.index("</table>", html.index(f'id="{table_id}"'))]


def _results(tests):
    r = base()
    for i, row in enumerate(r["table1"]):
        if row["group"] != "All pairs":
            row.update(smd_age=0.1234 * (i + 1), smd_sex=-0.0567, smd_method="standardised mean difference "
                       "(Austin 2009)")
    r["provenance"]["report_options"] = {"table1_tests": tests}
    return r


def test_table1_shows_smds_and_no_p_by_default():
    table = _table(render_html(_results(False)), "table1")
    head = re.sub(r"<[^>]+>", "|", table.split("</thead>")[0])
    assert "SMD, age" in head and "SMD, sex" in head and "p, age" not in head
    assert ">0.25<" in table and ">-0.06<" in table      # 0.1234 * 2 and -0.0567, 2 decimals


def test_table1_tests_shows_one_test_per_cell():
    r = _results(True)
    table = _table(render_html(r), "table1")
    assert "p, age" in table and "p, sex" in table
    assert "</sup>;" not in table                       # one p per cell (Welch), not "0.96a; 0.96b"


def test_numbers_have_thousands_separators_and_whole_percentages_below_100():
    assert fmt_num(223414) == "223,414" and fmt_num(60) == "60"
    assert fmt_pct(25, 44) == "25 (57%)" and fmt_pct(135, 230) == "135 (58.7%)"
    assert fmt_pct(1391, 2400) == "1,391 (58.0%)"
