"""UCIT metrics (many/metrics.py): answer normalisation, exact match, caption scores, accuracy-matrix metrics."""

from __future__ import annotations

import pytest

import many.metrics as metrics
from many.metrics import (
    CAPTION_METRICS,
    bwt,
    caption_score,
    caption_scores,
    exact_match,
    exact_match_score,
    maa,
    mfn,
    mft,
    normalize_answer,
    score,
    summarize,
)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("  The Cat. ", "the cat"),
        ("A)", "a"),
        ("Hello,   World!", "hello world"),
        ("\tthree\nred  circles ", "three red circles"),
        ("¿Qué?", "qué"),
        ("42", "42"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match() -> None:
    assert exact_match("Circle.", "circle")
    assert not exact_match("circles", "circle")
    assert exact_match_score(["A", "b.", "c"], ["a", "B", "d"]) == pytest.approx(200 / 3)
    assert score("exact_match", ["yes"], ["Yes!"]) == 100.0


BAD_SCORING = [
    ("no predictions", lambda: exact_match_score([], []), "exact_match: no predictions to score"),
    ("length mismatch", lambda: exact_match_score(["a"], ["a", "b"]), "exact_match: 1 predictions for 2 references"),
    ("caption length mismatch", lambda: caption_scores(["a", "b"], ["a"]), "caption: 2 predictions for 1 references"),
    ("caption without reference", lambda: caption_scores(["a"], [[]]), "caption: sample 0 has no reference caption"),
    ("unknown metric", lambda: score("bleu", ["a"], ["a"]), "unknown metric 'bleu'; known: caption, exact_match"),
]


@pytest.mark.parametrize(
    ("call", "fragment"), [case[1:] for case in BAD_SCORING], ids=[case[0] for case in BAD_SCORING]
)
def test_bad_scoring_inputs(call, fragment) -> None:  # noqa: ANN001
    with pytest.raises(ValueError) as error:
        call()
    assert fragment in str(error.value)


REFERENCES = [
    "a red circle in the top left corner",
    ["two blue squares next to a green triangle", "a green triangle beside two blue squares"],
    "a small yellow star on a dark background",
]
IDENTICAL = [
    "a red circle in the top left corner",
    "two blue squares next to a green triangle",
    "a small yellow star on a dark background",
]
DIFFERENT = ["a blue circle at the bottom", "three red squares", "a big star"]


@pytest.fixture(scope="module")
def identical_scores() -> dict[str, float]:
    return caption_scores(IDENTICAL, REFERENCES)  # one JVM round: tokenizer + METEOR


def test_identical_captions_score_the_maximum(identical_scores: dict[str, float]) -> None:
    assert tuple(identical_scores) == CAPTION_METRICS
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert identical_scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert 0.9 < identical_scores["METEOR"] <= 1.0  # METEOR's fragmentation penalty keeps it just below 1
    assert identical_scores["CIDEr"] > 1.0  # CIDEr-D ranges 0–10


def test_different_captions_score_lower_and_scoring_is_silent(
    identical_scores: dict[str, float], capfd: pytest.CaptureFixture[str]
) -> None:
    different = caption_scores(DIFFERENT, REFERENCES)
    assert capfd.readouterr() == ("", "")  # neither BLEU's prints nor the JVMs' logs leak
    for name in CAPTION_METRICS:
        assert 0.0 <= different[name] < identical_scores[name], name


def test_caption_score_is_100_times_the_mean_of_the_seven(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = dict(zip(CAPTION_METRICS, [0.8, 0.6, 0.4, 0.2, 0.5, 0.7, 2.1], strict=True))
    monkeypatch.setattr(metrics, "caption_scores", lambda predictions, references: fixed)
    assert caption_score(["x"], ["x"]) == pytest.approx(100 * 5.3 / 7)
    assert score("caption", ["x"], ["x"]) == pytest.approx(100 * 5.3 / 7)


# A[t][j]: score on task j after learning tasks 0..t; None above the diagonal.
A = [[80.0, None, None], [60.0, 90.0, None], [50.0, 70.0, 100.0]]


def test_matrix_metrics_by_hand() -> None:
    assert mft(A) == pytest.approx((80 + 90 + 100) / 3)
    assert mfn(A) == pytest.approx((50 + 70 + 100) / 3)
    assert maa(A) == pytest.approx((80 + (60 + 90) / 2 + (50 + 70 + 100) / 3) / 3)
    assert bwt(A) == pytest.approx(((50 - 80) + (70 - 90)) / 2)  # = −25: forgetting is negative
    assert summarize(A) == {"MFT": mft(A), "MFN": mfn(A), "MAA": maa(A), "BWT": bwt(A)}


def test_upper_triangle_is_ignored_and_one_task_has_no_backward_transfer() -> None:
    filled = [[80.0, 1.0, 2.0], [60.0, 90.0, 3.0], [50.0, 70.0, 100.0]]
    assert summarize(filled) == summarize(A)
    assert bwt([[40.0, 10.0], [55.0, 20.0]]) == pytest.approx(15.0)  # remembering better is positive
    assert summarize([[70.0]]) == {"MFT": 70.0, "MFN": 70.0, "MAA": 70.0, "BWT": 0.0}


BAD_MATRICES = [
    ("empty", [], "accuracy matrix is empty"),
    ("ragged", [[1.0, None], [2.0]], "not square: row 1 has 1 entries, expected 2"),
    ("too wide", [[1.0, None, None], [2.0, 3.0, None]], "not square: row 0 has 3 entries, expected 2"),
    ("missing lower entry", [[1.0, None], [None, 2.0]], "entry A[1][0] is None"),
    ("missing diagonal", [[None, None], [1.0, 2.0]], "entry A[0][0] is None"),
    ("NaN", [[1.0, None], [2.0, float("nan")]], "entry A[1][1] is nan"),
]


@pytest.mark.parametrize(
    ("matrix", "fragment"), [case[1:] for case in BAD_MATRICES], ids=[case[0] for case in BAD_MATRICES]
)
def test_bad_matrices(matrix, fragment) -> None:  # noqa: ANN001
    for metric in (mft, mfn, maa, bwt, summarize):
        with pytest.raises(ValueError) as error:
            metric(matrix)
        assert fragment in str(error.value)
