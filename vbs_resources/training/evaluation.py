"""Scoring an adapter against its base on a dataset's eval split.

Each eval example's answer (its last, assistant, message) is the reference; the base model and
the adapter each answer the example's other messages, greedily. Metrics, per model, as the mean
over examples:

- ``exact_match``: the answer is the reference, character for character (ends trimmed);
- ``normalized_match``: equal after lower-casing, dropping punctuation and collapsing spaces;
- ``token_f1``: SQuAD's bag-of-words F1 over normalized tokens;
- ``rouge_l``: ROUGE-L F-measure (Google's ``rouge-score``);
- ``json_valid``: where the references are JSON, the share of answers that parse as JSON.

``beats_base`` compares one metric (``rouge_l`` by default): the adapter passes when its score
is at least the base's plus ``margin``.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

METRICS = ("exact_match", "normalized_match", "token_f1", "rouge_l", "json_valid")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass(frozen=True)
class EvalExample:
    messages: list[dict[str, Any]]  # the prompt: every message but the answer
    reference: str


def eval_examples(lines: list[str]) -> list[EvalExample]:
    """A dataset's eval file as prompts and references (blank lines skipped)."""
    examples = []
    for line in lines:
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        examples.append(EvalExample(messages[:-1], str(messages[-1]["content"])))
    return examples


def normalize(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def _is_json(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict | list)


def score(references: list[str], predictions: list[str]) -> dict[str, float | None]:
    """The metrics of one model's answers; ``json_valid`` is None unless every reference is
    JSON (an object or an array)."""
    n = len(references)
    if not n:
        return dict.fromkeys(METRICS)
    pairs = list(zip(predictions, references, strict=True))
    wants_json = all(_is_json(r) for r in references)
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in pairs) / n,
        "normalized_match": sum(normalize(p) == normalize(r) for p, r in pairs) / n,
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
        "json_valid": sum(_is_json(p) for p, _ in pairs) / n if wants_json else None,
    }


@dataclass(frozen=True)
class Verdict:
    metric: str
    base: float
    adapter: float
    margin: float

    @property
    def passed(self) -> bool:
        return self.adapter >= self.base + self.margin

    def describe(self) -> str:
        word = "beats" if self.passed else "does not beat"
        return (
            f"The adapter {word} its base on {self.metric}: {self.adapter:.4f} against "
            f"{self.base:.4f} with a margin of {self.margin:g}."
        )


def compare(
    base: dict[str, float | None],
    adapter: dict[str, float | None],
    metric: str = "rouge_l",
    margin: float = 0.0,
) -> Verdict:
    if metric not in METRICS:
        raise ValueError(f"No metric named {metric!r}; known: {', '.join(METRICS)}.")
    return Verdict(metric, base[metric] or 0.0, adapter[metric] or 0.0, margin)


def table(base: dict[str, float | None], adapter: dict[str, float | None]) -> str:
    """The base-versus-adapter table, as Markdown for Dagster's metadata."""
    rows = ["| metric | base | adapter | change |", "|---|---:|---:|---:|"]
    for name in METRICS:
        b, a = base.get(name), adapter.get(name)
        if b is None or a is None:
            continue
        rows.append(f"| {name} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    return "\n".join(rows)
