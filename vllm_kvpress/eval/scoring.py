"""Owns scoring: RULER's string_match_all per sample, and accuracy with counts per task."""

import math
from collections.abc import Iterable
from dataclasses import dataclass


def string_match_all(prediction: str, references: Iterable[str]) -> float:
    """Fraction of `references` that occur in `prediction`, case-insensitive (RULER's metric)."""
    references = list(references)
    if not references:
        raise ValueError("a sample needs at least one expected string")
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def is_correct(prediction: str, references: Iterable[str]) -> bool:
    """Every expected string occurs in the prediction."""
    return string_match_all(prediction, references) == 1.0


@dataclass(frozen=True)
class TaskScore:
    task: str
    num_correct: int
    """Samples whose completion contains every expected string."""
    num_samples: int
    string_match_all: float
    """Mean per-sample fraction of expected strings found, in percent (RULER reports this)."""

    @property
    def accuracy(self) -> float:
        return 100.0 * self.num_correct / self.num_samples if self.num_samples else math.nan

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "correct": self.num_correct,
            "total": self.num_samples,
            "accuracy": self.accuracy,
            "string_match_all": self.string_match_all,
        }


def score_task(task: str, predictions: list[str], references: list[tuple[str, ...]]) -> TaskScore:
    if len(predictions) != len(references):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(references)} samples")
    fractions = [string_match_all(p, r) for p, r in zip(predictions, references, strict=True)]
    return TaskScore(
        task=task,
        num_correct=sum(f == 1.0 for f in fractions),
        num_samples=len(fractions),
        string_match_all=100.0 * sum(fractions) / len(fractions) if fractions else math.nan,
    )


def perplexity(nll: list[float]) -> float:
    """exp(mean NLL in nats)."""
    return math.exp(sum(nll) / len(nll))
