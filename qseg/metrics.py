"""Scoring generated answers: exact match and the quality of the reasoning steps.

Pure functions on strings, usable without a model.

Math datasets (GSM8K, MathQA) write the answer as calculator steps in ``<<…>>`` spans
followed by ``#### N``::

    Janet sells <<16-3-4=9>>9 eggs. She makes <<9*2=18>>18 dollars. #### 18

``score_math`` compares the final number and the steps of each prediction with its
reference; ``score_choice`` compares the answer letter of multiple-choice datasets
(OpenBookQA, HellaSwag).
"""

import math
import re
from collections.abc import Sequence

# The answer after "####": a sign and a "$" in either order, a number (thousands commas
# in groups of three, decimals, a trailing "."), an optional "%"; then the end of the text,
# a space, or punctuation that ends the text or a word. Anything else ("1/2", "2.5kg",
# "5-3", "12,34", "5.5.5") is not a number, rather than the first digits of one.
_ANSWER = re.compile(
    r"####\s*(?:\$\s*)?(?P<sign>[-+−]?)\s*(?:\$\s*)?"
    r"(?P<number>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)%?"
    r"(?=\s|$|[.,;:!?)\]]+(?:\s|$))"
)
_STEP = re.compile(r"<<(.*?)>>", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
# A standalone capital letter A-E: not part of a word such as "Answer" or "A1", and not
# the article "A" that starts a sentence ("A man is ..."), which choice B-E cannot be.
_CHOICE = re.compile(r"(?<![A-Za-z0-9_])(?:[B-E]|A(?!\s+[a-z]))(?![A-Za-z0-9_])")

# Arithmetic tokens: numbers (decimals, ".5", thousands separators "1,000"), operators
# in ASCII and unicode spellings, and parentheses.
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+\.?\d*|\.\d+"
_TOKEN = re.compile(rf"({_NUMBER})|([-+*/x×÷−()])")
_OPERATOR = {"+": "+", "-": "-", "−": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}
_SIGNED_NUMBER = re.compile(rf"[-+−]?(?:{_NUMBER})")

STEP_METRICS = (
    "step_precision",
    "step_recall",
    "step_iou",
    "step_dice",
    "step_overlap",
    "missing_steps",
    "extra_steps",
    "repetitions",
    "calc_errors",
)
MATH_METRICS = ("exact_match", *STEP_METRICS)
CHOICE_METRICS = ("accuracy",)
# Exact match forgives float rounding only: 42415751 is not 42415758.
EXACT_REL_TOL = 1e-9
# Shares of mistakes: a better model has less of them.
LOWER_IS_BETTER = ("missing_steps", "extra_steps", "repetitions", "calc_errors")


def extract_answer(text: str) -> float | None:
    """The number after the first ``####`` followed by one, or None when there is none.

    The first, as a model that goes on after its answer (a next ``Question: … ####``)
    has given it by then. ``$``, thousands commas and ``%`` are ignored and a trailing
    ``.`` is dropped, so ``#### $1,000.`` reads 1000.0; negative (``-`` or ``−``) and
    decimal numbers are read. A number must end at a space, the end of the text, or
    punctuation ending a sentence: ``#### 1/2``, ``#### 2.5kg``, ``#### 5-3`` or
    ``#### 12,34`` hold none.
    """
    match = _ANSWER.search(text)
    if match is None:
        return None
    sign = "-" if match["sign"] in ("-", "−") else ""
    return float(sign + match["number"].replace(",", ""))


def extract_steps(text: str) -> list[str]:
    """The ``<<…>>`` spans of ``text`` in order, with all whitespace removed.

    Empty spans are skipped. ``"<<2 + 3 = 5>> and <<add(n0, n1)>>"`` gives
    ``["2+3=5", "add(n0,n1)"]``.
    """
    steps = (_WHITESPACE.sub("", span) for span in _STEP.findall(text))
    return [step for step in steps if step]


def evaluate_arithmetic(expression: str) -> float:
    """Value of an arithmetic expression, computed by a small parser (never ``eval``).

    Grammar: numbers (``3``, ``2.5``, ``.5``, ``1,000``), binary ``+ - * /`` (also ``x``,
    ``×``, ``÷`` and ``−``), unary ``+``/``-`` and parentheses, with the usual precedence
    and left associativity. Whitespace is ignored.

    Raises:
        ValueError: the expression uses anything else or is malformed.
        ZeroDivisionError: it divides by zero.
    """
    tokens = _tokenize(expression)
    value, position = _parse_sum(tokens, 0)
    if position != len(tokens):
        raise ValueError(f"unexpected {tokens[position]!r} in {expression!r}")
    return value


def _tokenize(expression: str) -> list[str | float]:
    text = _WHITESPACE.sub("", expression)
    tokens: list[str | float] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(
                f"{text[position]!r} in {expression!r} is not a number, an operator "
                "(+ - * / x × ÷ −) or a parenthesis"
            )
        number, symbol = match.groups()
        if number is not None:
            tokens.append(float(number.replace(",", "")))
        else:
            tokens.append(_OPERATOR.get(symbol, symbol))
        position = match.end()
    return tokens


# Recursive descent: sum := product (('+'|'-') product)*, product := unary (('*'|'/') unary)*,
# unary := ('+'|'-') unary | number | '(' sum ')'. Each returns (value, next position).
def _parse_sum(tokens: list[str | float], position: int) -> tuple[float, int]:
    value, position = _parse_product(tokens, position)
    while position < len(tokens) and tokens[position] in ("+", "-"):
        operator = tokens[position]
        right, position = _parse_product(tokens, position + 1)
        value = value + right if operator == "+" else value - right
    return value, position


def _parse_product(tokens: list[str | float], position: int) -> tuple[float, int]:
    value, position = _parse_unary(tokens, position)
    while position < len(tokens) and tokens[position] in ("*", "/"):
        operator = tokens[position]
        right, position = _parse_unary(tokens, position + 1)
        value = value * right if operator == "*" else value / right
    return value, position


def _parse_unary(tokens: list[str | float], position: int) -> tuple[float, int]:
    if position == len(tokens):
        raise ValueError("expression ends where a number was expected")
    token = tokens[position]
    if token in ("+", "-"):
        value, position = _parse_unary(tokens, position + 1)
        return (value if token == "+" else -value), position
    if token == "(":
        value, position = _parse_sum(tokens, position + 1)
        if position == len(tokens) or tokens[position] != ")":
            raise ValueError("missing closing parenthesis")
        return value, position + 1
    if isinstance(token, float):
        return token, position + 1
    raise ValueError(f"unexpected {token!r} where a number was expected")


def check_step(step: str) -> bool | None:
    """Whether a calculator step's arithmetic is right.

    A step of the form ``expression = number`` (one ``=``, an expression
    :func:`evaluate_arithmetic` reads on the left, a number on the right) is right when
    the number equals the expression's value, either within ``math.isclose(rel_tol=1e-6)``
    or, when the number has decimals, rounded to that many decimals (a model writing
    ``<<10/3=3.33>>`` is right). Division by zero is wrong.

    Returns:
        True (right), False (wrong), or None when the step has another form (MathQA's
        ``add(n0,n1)``, ``3/4=3/4``, a word) and cannot be checked.
    """
    left, equals, right = step.partition("=")
    if not equals or "=" in right or not _SIGNED_NUMBER.fullmatch(right):
        return None
    stated = float(right.replace(",", "").replace("−", "-"))
    try:
        value = evaluate_arithmetic(left)
    except ZeroDivisionError:
        return False
    except ValueError:
        return None
    if math.isclose(value, stated, rel_tol=1e-6, abs_tol=1e-9):
        return True
    decimals = len(right.partition(".")[2])
    # Half a unit of the last written decimal, plus float slack for values like 0.665.
    return decimals > 0 and abs(value - stated) <= 0.5 * 10**-decimals + 1e-9


def math_example_metrics(prediction: str, reference: str) -> dict[str, float | None]:
    """Metrics of one math prediction against its reference (see :func:`score_math`).

    The step metrics are None when the reference has no step.
    """
    predicted_answer = extract_answer(prediction)
    reference_answer = extract_answer(reference)
    exact = (
        predicted_answer is not None
        and reference_answer is not None
        and math.isclose(predicted_answer, reference_answer, rel_tol=EXACT_REL_TOL)
    )
    metrics: dict[str, float | None] = {"exact_match": float(exact)}

    predicted_list = extract_steps(prediction)
    predicted, expected = set(predicted_list), set(extract_steps(reference))
    if not expected:
        metrics.update(dict.fromkeys(STEP_METRICS))
        return metrics
    common = len(predicted & expected)
    metrics["step_recall"] = common / len(expected)
    metrics["step_iou"] = common / len(predicted | expected)
    metrics["step_dice"] = 2 * common / (len(predicted) + len(expected))
    metrics["missing_steps"] = 1 - common / len(expected)
    if not predicted:
        for name in ("step_precision", "step_overlap", "extra_steps", "repetitions", "calc_errors"):
            metrics[name] = 0.0
        return metrics
    metrics["step_precision"] = common / len(predicted)
    metrics["step_overlap"] = common / min(len(predicted), len(expected))
    metrics["extra_steps"] = 1 - common / len(predicted)
    metrics["repetitions"] = 1 - len(predicted) / len(predicted_list)
    checks = [check_step(step) for step in predicted]
    checked = [check for check in checks if check is not None]
    metrics["calc_errors"] = checked.count(False) / len(checked) if checked else 0.0
    return metrics


def score_math(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    """Exact match and step metrics of math predictions (GSM8K, MathQA layouts).

    Per example, with A the number after the first ``####`` (:func:`extract_answer`), P the
    set and p the list of predicted steps, L the set of reference steps (``<<…>>`` spans
    with whitespace removed, :func:`extract_steps`):

    - ``exact_match``: 1 when both texts have an answer and
      ``math.isclose(A_pred, A_ref, rel_tol=1e-9)``, else 0 (``#### 1,000`` equals
      ``#### 1000.0``, ``#### 1000001`` does not; a text without ``####`` never matches).
    - ``step_precision`` |P∩L|/|P|, ``step_recall`` |P∩L|/|L|, ``step_iou`` |P∩L|/|P∪L|,
      ``step_dice`` 2|P∩L|/(|P|+|L|), ``step_overlap`` |P∩L|/min(|P|,|L|).
    - ``missing_steps`` |L∖P|/|L|: share of reference steps absent from the prediction.
    - ``extra_steps`` |P∖L|/|P|: share of predicted steps absent from the reference.
    - ``repetitions`` (len(p) − |P|)/len(p): share of predicted steps that repeat an
      earlier one.
    - ``calc_errors``: among the distinct predicted steps of the form
      ``expression = number``, the share whose arithmetic is wrong (:func:`check_step`);
      other forms, like MathQA's ``add(n0,n1)``, are not counted; 0 when none is checkable.

    Precision, overlap, extra_steps, repetitions and calc_errors are 0 when the prediction
    has no step.

    Returns:
        ``n`` (number of examples), ``n_with_steps`` (those whose reference has at least one
        step), ``exact_match`` averaged over all examples and each step metric averaged over
        the examples with reference steps; a mean over no example is None.

    Raises:
        ValueError: predictions and references differ in length, or one is a single string.
    """
    _check_lengths(predictions, references)
    per_example = [math_example_metrics(p, r) for p, r in zip(predictions, references, strict=True)]
    summary: dict[str, float | None] = {
        "n": len(per_example),
        "n_with_steps": sum(m["step_iou"] is not None for m in per_example),
    }
    for name in MATH_METRICS:
        summary[name] = _mean([m[name] for m in per_example if m[name] is not None])
    return summary


def extract_choice(text: str) -> str | None:
    """The first standalone capital letter A–E in ``text`` (``"Answer: C."`` gives "C").

    An "A" followed by a lowercase word is the article, not a choice: ``"A man runs. B"``
    gives "B".
    """
    match = _CHOICE.search(text)
    return match.group(0) if match else None


def score_choice(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    """Accuracy of multiple-choice predictions (OpenBookQA, HellaSwag layouts).

    ``accuracy``: share of examples whose predicted letter (the first standalone capital
    A–E that is not the article "A", :func:`extract_choice`) equals the reference letter;
    a prediction without one is wrong. Returns ``accuracy`` (None when there is no
    example) and ``n``.

    Raises:
        ValueError: lengths differ, an input is a single string, or a reference holds
            no letter A–E.
    """
    _check_lengths(predictions, references)
    hits = []
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        expected = extract_choice(reference)
        if expected is None:
            raise ValueError(f"reference {index} ({reference!r}) holds no answer letter A-E")
        hits.append(float(extract_choice(prediction) == expected))
    return {"n": len(hits), "accuracy": _mean(hits)}


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str):
            raise ValueError(f"{name} must be a list of strings, got a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; "
            "give one prediction per reference"
        )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
