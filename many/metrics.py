"""Scores and continual-learning metrics of the UCIT protocol (docs/design.md §1 "Metrics (UCIT protocol)";
UCIT / HiDe-LLaVA, Guo et al. 2025).

Per task: QA tasks are scored by exact match after `normalize_answer`; caption tasks by the mean of
BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap (Java, PTB tokenizer), ×100.
Over the stream, with A[t][j] the score (percent) on task j after learning tasks 0..t (entries j > t are
ignored and may be None):

    MFT = mean_t A[t][t]                          (mean fine-tuned accuracy: plasticity)
    MFN = mean_j A[T−1][j]                        (mean final accuracy, "Last")
    MAA = mean_t mean_{j≤t} A[t][j]               (mean average accuracy over the stream)
    BWT = mean_{j<T−1} (A[T−1][j] − A[j][j])      (backward transfer; forgetting is negative)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from many.data.schema import Metric
from many.meteor import meteor as shared_meteor

Matrix = Sequence[Sequence[float | None]]


def normalize_answer(text: str) -> str:
    """Lowercase, delete punctuation (any Unicode category P*), collapse and strip whitespace."""
    kept = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Case-, punctuation- and whitespace-insensitive equality."""
    return normalize_answer(prediction) == normalize_answer(reference)


def _check_pairs(predictions: Sequence[object], references: Sequence[object], metric: str) -> None:
    if len(predictions) == 0:
        raise ValueError(f"{metric}: no predictions to score (the test split or its predictions are empty)")
    if len(predictions) != len(references):
        raise ValueError(
            f"{metric}: {len(predictions)} predictions for {len(references)} references; need one per sample"
        )


def exact_match_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage (0–100) of predictions that exactly match their reference."""
    _check_pairs(predictions, references, "exact_match")
    hits = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Silence Python prints and the Java subprocesses pycocoevalcap starts (they write to fd 1/2).

    The redirect is process-wide for its duration: other threads' output in that window is dropped too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def caption_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap; CIDEr is its CIDEr-D, range 0–10).

    Each reference is one caption or a list of captions. All captions go through pycocoevalcap's
    PTBTokenizer (lowercase, punctuation removed) in one JVM call, and METEOR scores the whole batch on this
    process's one METEOR JVM (many.meteor: started on the first call, reused by every later one — its ~6 s start
    was most of a caption task's eval). Call this once per task, never per sample. pycocoevalcap's
    tokenizer writes its temporary input file next to its jar, so the install directory must be writable.
    """
    _check_pairs(predictions, references, "caption")
    reference_lists = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    for i, refs in enumerate(reference_lists):
        if not refs:
            raise ValueError(f"caption: sample {i} has no reference caption; give at least one")
    captions = {("pred", i): [{"caption": p}] for i, p in enumerate(predictions)}
    captions |= {("ref", i): [{"caption": r} for r in refs] for i, refs in enumerate(reference_lists)}
    with _silenced():
        tokens = PTBTokenizer().tokenize(captions)
        res = {i: tokens[("pred", i)] for i in range(len(predictions))}
        gts = {i: tokens[("ref", i)] for i in range(len(predictions))}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        meteor = shared_meteor(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    values = [*bleu, meteor, rouge, cider]
    return {name: float(value) for name, value in zip(CAPTION_METRICS, values, strict=True)}


def caption_score(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """100 × mean of the seven `caption_scores` (as UCIT does). CIDEr ranges 0–10, so this can exceed 100."""
    scores = caption_scores(predictions, references)
    return 100.0 * sum(scores.values()) / len(scores)


SCORERS: dict[Metric, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match_score,
    "caption": caption_score,
}


def score(metric: Metric, predictions: Sequence[str], references: Sequence[str]) -> float:
    """The task's score in percent, by the metric its TaskData names."""
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[metric](predictions, references)


def _lower_triangle(A: Matrix) -> list[list[float]]:
    """Rows A[t][0..t] as floats; ValueError naming the entry for a non-square or incomplete matrix."""
    T = len(A)
    if T == 0:
        raise ValueError("accuracy matrix is empty; need one row per learned task")
    rows = []
    for t, row in enumerate(A):
        if len(row) != T:
            raise ValueError(f"accuracy matrix is not square: row {t} has {len(row)} entries, expected {T}")
        for j in range(t + 1):
            value = row[j]
            if value is None or not math.isfinite(value):
                raise ValueError(
                    f"accuracy matrix entry A[{t}][{j}] is {value!r}; every score on a learned task (j ≤ t) "
                    f"must be a finite number"
                )
        rows.append([float(row[j]) for j in range(t + 1)])
    return rows


def mft(A: Matrix) -> float:
    """Mean fine-tuned accuracy: mean_t A[t][t]."""
    rows = _lower_triangle(A)
    return sum(row[-1] for row in rows) / len(rows)


def mfn(A: Matrix) -> float:
    """Mean final accuracy ("Last"): mean_j A[T−1][j]."""
    last = _lower_triangle(A)[-1]
    return sum(last) / len(last)


def maa(A: Matrix) -> float:
    """Mean average accuracy: mean_t mean_{j≤t} A[t][j]."""
    rows = _lower_triangle(A)
    return sum(sum(row) / len(row) for row in rows) / len(rows)


def bwt(A: Matrix) -> float:
    """Backward transfer: mean_{j<T−1} (A[T−1][j] − A[j][j]); negative = forgetting, 0.0 for one task."""
    rows = _lower_triangle(A)
    drops = [rows[-1][j] - rows[j][j] for j in range(len(rows) - 1)]
    return sum(drops) / len(drops) if drops else 0.0


def summarize(A: Matrix) -> dict[str, float]:
    """{"MFT", "MFN", "MAA", "BWT"} of one method's accuracy matrix."""
    return {"MFT": mft(A), "MFN": mfn(A), "MAA": maa(A), "BWT": bwt(A)}
