"""study.toml `series` is structured (issue 20, section 1): the limitations follow its first word, never prose."""

import pytest

from covreport.errors import ReportError
from covreport.report.limitations import limitations
from covreport.study import series_kind, validate_study


@pytest.mark.parametrize("text, kind", [
    ("Convenience series.", "convenience"), ("consecutive: every patient admitted", "consecutive"),
    ("Random", "random"), ("convenience-sample of two collections", "convenience"),
    # a word later in the text is not the kind: the report once read this as a convenience series
    ("Complete series of all generated patients, not a convenience series.", None), ("", None),
])
def test_the_kind_is_the_first_word(text, kind):
    assert series_kind(text) == kind


def test_a_series_without_a_kind_is_refused_with_the_fix():
    with pytest.raises(ReportError, match=r"field 'series' must begin with consecutive, random or convenience"):
        validate_study({"series": "Complete series of all generated patients, not a convenience series."})
    assert validate_study({"series": "Consecutive: every generated patient"}) == {
        "series": "Consecutive: every generated patient"}


def _selection(study):
    rows = [r for r in limitations({"study": study}) if r["kind"].lower().startswith("selection")]
    return " ".join(r["text"] for r in rows)


def test_limitations_follow_the_kind():
    assert "convenience series" in _selection({"series": "convenience: two public collections"})
    # "not a convenience series" in the description of a consecutive series is no convenience series
    assert "convenience" not in _selection({"series": "consecutive: every patient, not a convenience series"})
    assert "not stated (study.toml: series)" in _selection({})
    # an older results.json whose series is free text: said so, not read from the prose
    assert "not stated as consecutive, random or convenience" in _selection({"series": "a complete series"})
