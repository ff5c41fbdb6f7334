"""Scores for free-text answers (users' own data): exact match and token F1, as SQuAD scores.

Both sides are normalised the SQuAD way (lower case, punctuation and the articles a, an,
the removed, whitespace collapsed). When both sides read as a number (`1,000`, `$5`,
`12.50`, `40%`), they compare as numbers: `1,000` equals `1000.0`. An answer pattern (a
regex with a group) first reduces both the prediction and the reference to what its first
group matches, so `#### (\\S+)` or `answer is (\\w+)` compare only the final answer.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

TEXT_METRICS = ("exact_match", "f1")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def as_number(text: str) -> float | None:
    """The number a whole answer states (`1,000`, `$5`, `40%`, `3.`), or None."""
    core = text.strip().strip("$€£%").rstrip(".").strip()
    if not core or not _NUMBER.fullmatch(core) or not any(c.isdigit() for c in core):
        return None
    return float(core.replace(",", ""))


def compile_answer_pattern(pattern: str, references: Sequence[str]) -> re.Pattern[str]:
    """The `--answer-pattern` regex, checked before anything is generated.

    Raises:
        ValueError: not a valid regex, no group, or no reference it matches.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--answer-pattern {pattern!r} is not a valid regex: {err}") from err
    if compiled.groups < 1:
        raise ValueError(
            f"--answer-pattern {pattern!r} has no group: put the answer in parentheses, "
            "e.g. '#### (\\S+)'"
        )
    if references and not any(compiled.search(reference) for reference in references):
        raise ValueError(
            f"--answer-pattern {pattern!r} matches none of the {len(references)} references; "
            f"the first one is {references[0][:80]!r}"
        )
    return compiled


def reduce(text: str, pattern: re.Pattern[str] | None) -> str:
    """What `pattern`'s first group matches in `text` ("" when it does not match)."""
    if pattern is None:
        return text
    match = pattern.search(text)
    return (match.group(1) or "") if match else ""


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answers agree as numbers or after normalisation, else 0.0."""
    numbers = as_number(prediction), as_number(reference)
    if None not in numbers:
        return float(math.isclose(*numbers, rel_tol=1e-9, abs_tol=1e-12))
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 of the normalised tokens (numbers that agree count as a full match)."""
    if exact_match(prediction, reference):
        return 1.0
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def score_text(
    predictions: Sequence[str],
    references: Sequence[str],
    answer_pattern: re.Pattern[str] | None = None,
) -> dict[str, float | int | None]:
    """Mean exact match and token F1 over the pairs.

    Args:
        predictions: generated answers.
        references: the expected answers, one per prediction.
        answer_pattern: reduces both sides first (`compile_answer_pattern`).

    Returns:
        {"n": pairs, "exact_match": mean, "f1": mean} (None means when there is no pair).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    pairs = [
        (reduce(p, answer_pattern), reduce(r, answer_pattern))
        for p, r in zip(predictions, references, strict=True)
    ]
    n = len(pairs)
    if n == 0:
        return {"n": 0, "exact_match": None, "f1": None}
    return {
        "n": n,
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "f1": sum(token_f1(p, r) for p, r in pairs) / n,
    }
