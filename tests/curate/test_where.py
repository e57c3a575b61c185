"""The --where language: results equal masks written by hand in numpy; what it refuses; why rows drop."""

import numpy as np
import pytest

from ldmclip.core.errors import UserError
from ldmclip.curate.where import parse_where

KINDS = {"clip_score": "number", "aesthetic": "number", "width": "number", "dup_keep": "bool", "caption": "string"}


@pytest.fixture
def columns():
    rng = np.random.default_rng(0)
    n = 500
    return n, {
        "clip_score": rng.uniform(0, 0.5, n),
        "aesthetic": rng.uniform(0, 10, n),
        "width": rng.integers(100, 1000, n).astype(np.float64),
        "dup_keep": rng.random(n) < 0.7,
        "caption": np.array(rng.choice(["a cat", "a dog", "a car"], n), dtype=object),
    }


CASES = [
    ("clip_score >= 0.28", lambda c: c["clip_score"] >= 0.28),
    ("clip_score >= 0.28 and aesthetic >= 5", lambda c: (c["clip_score"] >= 0.28) & (c["aesthetic"] >= 5)),
    ("0.1 < clip_score <= 0.3 < 0.4", lambda c: (c["clip_score"] > 0.1) & (c["clip_score"] <= 0.3)),
    ("not (aesthetic < 2 or width != 512) or dup_keep",
     lambda c: ~((c["aesthetic"] < 2) | (c["width"] != 512)) | c["dup_keep"]),
    ("dup_keep", lambda c: c["dup_keep"]),
    ("dup_keep == False and caption in ['a cat', 'a car']",
     lambda c: ~c["dup_keep"] & np.isin(c["caption"], ["a cat", "a car"])),
    ("caption not in ['a dog'] and width > -1", lambda c: c["caption"] != "a dog"),
    ("aesthetic > 11 or True", lambda c: np.ones(len(c["aesthetic"]), bool)),
    ("1 > 2", lambda c: np.zeros(len(c["aesthetic"]), bool)),
]


@pytest.mark.parametrize("text, by_hand", CASES)
def test_the_mask_equals_the_one_written_by_hand(columns, text, by_hand):
    n, values = columns
    mask = parse_where(text, KINDS).mask(values, n)
    assert mask.dtype == bool and mask.shape == (n,)
    np.testing.assert_array_equal(mask, by_hand(values))
    assert 0 < by_hand(values).sum() < n or text in ("aesthetic > 11 or True", "1 > 2")


@pytest.mark.parametrize("text, part", [
    ("clip_score.real > 0", "an attribute"), ("abs(clip_score) > 0", "a function call"),
    ("caption[0] == 'a'", "a subscript"), ("(lambda: 1)() > 0", "a function call"),
    ("clip_score * 2 > 0.5", "arithmetic"), ("__import__('os').system('true')", "a function call"),
    ("clip_score > 0 if dup_keep else False", "an if-expression"), ("dup_keep is True", "identity test"),
    ("caption > 3", "a comparison of a string with a number"), ("aesthetic", "not true or false"),
    ("dup_keep and 5", "not true or false"), ("dup_keep < True", "an ordering"),
    ("width in [512, 'x']", "a string in a list"), ("width in [w for w in [1]]", "not a list of constants"),
    ("clip_score > None", "another type"),
])
def test_refused_constructs_are_one_line_errors_naming_the_columns(text, part):
    with pytest.raises(UserError) as error:
        parse_where(text, KINDS)
    message = str(error.value)
    assert part in message and "\n" not in message
    assert "clip_score (number)" in message and "dup_keep (bool)" in message


def test_an_unknown_column_names_the_available_ones():
    with pytest.raises(UserError, match=r"unknown column 'clipscore'.*clip_score \(number\), aesthetic"):
        parse_where("clipscore >= 0.28", KINDS)


@pytest.mark.parametrize("text", ["clip_score >= ", "clip_score = 0.3", "clip_score >= 0.28 && dup_keep", "", "   "])
def test_bad_syntax_is_a_one_line_error(text):
    with pytest.raises(UserError) as error:
        parse_where(text, KINDS)
    assert "the columns are: clip_score" in str(error.value) and "\n" not in str(error.value)
    if "=" in text and "==" not in text and ">=" not in text:
        assert "compare with ==" in str(error.value)


def test_reasons_name_the_failed_top_level_clauses_as_written():
    where = parse_where("clip_score >= 0.28 and  aesthetic>=5 and (dup_keep or width > 900)", KINDS)
    assert where.clauses == ("clip_score >= 0.28", "aesthetic>=5", "dup_keep or width > 900")
    assert where.columns == ("clip_score", "aesthetic", "dup_keep", "width")
    assert where.thresholds == {"clip_score": (0.28,), "aesthetic": (5.0,), "width": (900.0,)}
    values = {"clip_score": np.array([0.3, 0.1, 0.1, 0.5]), "aesthetic": np.array([6.0, 6.0, 1.0, 9.0]),
              "dup_keep": np.array([True, True, False, False]), "width": np.array([10.0, 10.0, 10.0, 950.0])}
    kept, reasons = where.reasons(values, 4)
    assert kept.tolist() == [True, False, False, True]
    assert reasons.tolist() == ["", "clip_score >= 0.28", "clip_score >= 0.28; aesthetic>=5; dup_keep or width > 900", ""]


def test_a_top_level_or_is_one_clause_and_nan_fails_comparisons():
    where = parse_where("clip_score > 0.3 or aesthetic < -1.5", KINDS)
    assert where.thresholds == {"clip_score": (0.3,), "aesthetic": (-1.5,)}
    values = {"clip_score": np.array([np.nan, 0.5]), "aesthetic": np.array([0.0, 0.0])}
    kept, reasons = where.reasons(values, 2)
    assert kept.tolist() == [False, True] and reasons.tolist() == ["clip_score > 0.3 or aesthetic < -1.5", ""]
