import math

import pytest

from qseg.metrics import (
    STEP_METRICS,
    check_step,
    evaluate_arithmetic,
    extract_answer,
    extract_choice,
    extract_steps,
    math_example_metrics,
    score_choice,
    score_math,
)

GSM8K_REFERENCE = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"
)


# --- final answer -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 18", 18.0),
        ("steps #### 1,000", 1000.0),
        ("#### 1000.0", 1000.0),
        ("#### $1,234.50", 1234.5),
        ("#### 45%", 45.0),
        ("#### 7.", 7.0),
        ("#### -3", -3.0),
        ("#### −3.25", -3.25),
        ("#### -$5", -5.0),
        ("#### .5", 0.5),
        ("####12", 12.0),
        ("#### 18 dollars\nQuestion: next", 18.0),
        ("#### $-12.", -12.0),
        ("#### 1,000,000.5)", 1000000.5),
        ("#### 5 kg", 5.0),
        ("#### 18\nQuestion: next one\nAnswer: <<2*4=8>> #### 8", 18.0),  # the first wins
        ("#### 1/2 so #### 4", 4.0),  # the first followed by a number
        ("#### 3 ####", 3.0),
    ],
)
def test_extract_answer_reads_the_number_after_the_first_marker(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    # a number is read whole: not "2" of "2.5kg", "1" of "1.5/2" or "3" of "3.75hours"
    ["18", "no marker here", "#### ", "#### eighteen", "#### 1/2", "#### 2.5kg", "#### 1.5/2",
     "#### 3.75hours", "#### 3^2", "#### 5-3", "#### 5*2", "#### 5:30", "#### 5.5.5",
     "#### 12,34", "#### 1,2,3", "#### 5,00", "#### 1e3"],
)  # fmt: skip
def test_extract_answer_is_none_without_a_number_after_the_marker(text):
    assert extract_answer(text) is None


def test_exact_match_handles_separators_signs_and_decimals():
    predictions = ["#### 1,000", "#### $-12.", "#### 0.3", "#### 99", "no answer", "#### 7"]
    references = ["#### 1000.0", "#### -12", "#### 0.30000000000000004", "#### 98", "#### 3", "7"]
    # float rounding is forgiven; a reference without "####" never matches.
    assert score_math(predictions, references)["exact_match"] == pytest.approx(3 / 6)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("#### 42415751", "#### 42415758.0"),
        ("#### 1000001", "#### 1000000"),
        ("#### 0.33", "#### 0.333"),
    ],
)
def test_exact_match_is_exact_on_large_and_rounded_numbers(prediction, reference):
    # MathQA's wrong options differ from the right one by 1e-7 of it, or by rounding.
    assert score_math([prediction], [reference])["exact_match"] == 0.0


def test_mathqa_float_answers_match_integer_predictions():
    assert score_math(["#### 38"], ["<<add(n1,const_100)>> #### 38.0"])["exact_match"] == 1.0


# --- steps --------------------------------------------------------------------------


def test_extract_steps_keeps_order_removes_whitespace_and_skips_empty_spans():
    text = "a <<2 + 3 = 5>> b <<>> c <<add(n0, n1)>> d <<2+3=5>>"
    assert extract_steps(text) == ["2+3=5", "add(n0,n1)", "2+3=5"]
    assert extract_steps(GSM8K_REFERENCE) == ["16-3-4=9", "9*2=18"]
    assert extract_steps("#### 5") == []


def test_step_metrics_on_a_partial_prediction():
    # P = {a, b, x}, L = {a, b, c, d}: |P∩L| = 2, |P∪L| = 5.
    prediction = "<<1+1=2>> <<2*3=6>> <<9-1=8>> #### 6"
    reference = "<<1+1=2>> <<2*3=6>> <<6+1=7>> <<7*2=14>> #### 14"
    m = math_example_metrics(prediction, reference)
    assert m["exact_match"] == 0.0
    assert m["step_precision"] == pytest.approx(2 / 3)
    assert m["step_recall"] == pytest.approx(2 / 4)
    assert m["step_iou"] == pytest.approx(2 / 5)
    assert m["step_dice"] == pytest.approx(2 * 2 / (3 + 4))
    assert m["step_overlap"] == pytest.approx(2 / 3)
    assert m["missing_steps"] == pytest.approx(2 / 4)
    assert m["extra_steps"] == pytest.approx(1 / 3)
    assert m["repetitions"] == 0.0
    assert m["calc_errors"] == 0.0


def test_a_perfect_prediction_scores_one_and_no_errors():
    m = math_example_metrics(GSM8K_REFERENCE.replace("\n", " "), GSM8K_REFERENCE)
    assert m["exact_match"] == 1.0
    for name in ("step_precision", "step_recall", "step_iou", "step_dice", "step_overlap"):
        assert m[name] == 1.0, name
    for name in ("missing_steps", "extra_steps", "repetitions", "calc_errors"):
        assert m[name] == 0.0, name


def test_prediction_without_steps_scores_zero_and_misses_everything():
    m = math_example_metrics("#### 18", GSM8K_REFERENCE)
    assert m["exact_match"] == 1.0
    for name in ("step_precision", "step_recall", "step_iou", "step_dice", "step_overlap"):
        assert m[name] == 0.0, name
    assert m["missing_steps"] == 1.0
    assert m["extra_steps"] == 0.0
    assert m["repetitions"] == 0.0
    assert m["calc_errors"] == 0.0


def test_repeated_steps_count_once_in_the_sets_and_as_repetitions():
    prediction = "<<16-3-4=9>> <<16-3-4=9>> <<16 - 3 - 4 = 9>> <<9*2=18>> #### 18"
    m = math_example_metrics(prediction, GSM8K_REFERENCE)
    assert m["step_iou"] == 1.0
    assert m["step_precision"] == 1.0
    assert m["repetitions"] == pytest.approx(2 / 4)


def test_wrong_arithmetic_is_counted_among_checkable_steps():
    prediction = "<<16-3-4=9>> <<9*2=19>> <<19/0=1>> <<add(n0,n1)>> #### 19"
    m = math_example_metrics(prediction, GSM8K_REFERENCE)
    # Checkable: 16-3-4=9 (right), 9*2=19 (wrong), 19/0=1 (wrong); add(n0,n1) not counted.
    assert m["calc_errors"] == pytest.approx(2 / 3)
    assert m["extra_steps"] == pytest.approx(3 / 4)


def test_mathqa_function_steps_are_matched_but_not_arithmetic_checked():
    reference = "<<add(n1,const_100)>> <<subtract(const_100,n0)>> <<divide(#1,#0)>> #### 1.38"
    prediction = "<<add(n1, const_100)>> <<multiply(#0,n2)>> #### 1.38"
    m = math_example_metrics(prediction, reference)
    assert m["exact_match"] == 1.0
    assert m["step_iou"] == pytest.approx(1 / 4)
    assert m["missing_steps"] == pytest.approx(2 / 3)
    assert m["calc_errors"] == 0.0


def test_reference_without_steps_leaves_step_metrics_out_of_the_means():
    predictions = ["<<1+1=2>> #### 2", "<<1+1=3>> #### 3"]
    references = ["#### 2", "<<1+1=2>> #### 2"]
    assert all(math_example_metrics(predictions[0], references[0])[n] is None for n in STEP_METRICS)
    summary = score_math(predictions, references)
    assert summary["n"] == 2
    assert summary["n_with_steps"] == 1
    assert summary["exact_match"] == 0.5
    # Only the second example counts: its prediction's single step is wrong and not in L.
    assert summary["step_iou"] == 0.0
    assert summary["missing_steps"] == 1.0
    assert summary["calc_errors"] == 1.0


def test_score_math_averages_each_metric_over_examples():
    predictions = ["<<1+1=2>> #### 2", "<<2+2=5>> <<2+2=5>> #### 4"]
    references = ["<<1+1=2>> #### 2", "<<2+2=4>> #### 4"]
    summary = score_math(predictions, references)
    assert summary["exact_match"] == 1.0
    assert summary["step_iou"] == pytest.approx((1 + 0) / 2)
    assert summary["repetitions"] == pytest.approx((0 + 1 / 2) / 2)
    assert summary["calc_errors"] == pytest.approx((0 + 1) / 2)
    assert set(summary) == {"n", "n_with_steps", "exact_match", *STEP_METRICS}


def test_score_math_without_examples_has_no_means():
    assert score_math([], []) == {"n": 0, "n_with_steps": 0} | {
        name: None for name in ("exact_match", *STEP_METRICS)
    }


# --- arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2+3*4", 14.0),
        ("(2+3)*4", 20.0),
        ("10-4-3", 3.0),
        ("48/2/3", 8.0),
        ("-3*-2", 6.0),
        ("-(2+3)", -5.0),
        ("2 × 3 ÷ 4 − 1", 0.5),
        ("3x4", 12.0),
        ("1,000*1.5", 1500.0),
        ("10*.5", 5.0),
        ("7", 7.0),
    ],
)
def test_evaluate_arithmetic(expression, value):
    assert evaluate_arithmetic(expression) == pytest.approx(value)


@pytest.mark.parametrize("expression", ["", "2+", "(2+3", "2)", "2**3", "add(n0,n1)", "__import__"])
def test_evaluate_arithmetic_rejects_other_input(expression):
    with pytest.raises(ValueError):
        evaluate_arithmetic(expression)


def test_evaluate_arithmetic_division_by_zero():
    with pytest.raises(ZeroDivisionError):
        evaluate_arithmetic("1/(2-2)")


@pytest.mark.parametrize(
    ("step", "verdict"),
    [
        ("16-3-4=9", True),
        ("9*2=19", False),
        ("5=5", True),
        ("2-7=-5", True),
        ("2-7=−5", True),
        ("1,000+1=1,001", True),
        ("10/3=3.33", True),  # rounded to the decimals written
        ("2/3=.67", True),
        ("10/3=3.4", False),
        ("10/3=3", False),  # no decimals written: no rounding allowed
        ("1/0=1", False),
        ("add(n0,n1)", None),
        ("3/4=3/4", None),
        ("560//10=56", None),
        ("1+1=2=2", None),
        ("x=5", None),
    ],
)
def test_check_step(step, verdict):
    assert check_step(step) is verdict


# --- multiple choice ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("C", "C"),
        (" B) the sun", "B"),
        ("Answer: (D).", "D"),
        ("All of them: E", "E"),
        ("F G", None),
        ("answer", None),
        ("A1 b", None),
        ("A", "A"),
        ("A. a lake", "A"),
        ("A\nB", "A"),
        ("A man is seen. Answer: B", "B"),
        ("A woman", None),
    ],
)
def test_extract_choice_takes_the_first_standalone_letter(text, letter):
    assert extract_choice(text) == letter


def test_score_choice_accuracy():
    summary = score_choice(["A", "Answer: B", "C or D", "none"], ["A", "C", "C", "D"])
    assert summary == {"n": 4, "accuracy": 0.5}


def test_score_choice_rejects_a_reference_without_a_letter():
    with pytest.raises(ValueError, match="reference 1"):
        score_choice(["A", "B"], ["A", "banana"])


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("score", [score_math, score_choice])
def test_lengths_must_match(score):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["A", "B"], ["A"])


@pytest.mark.parametrize("score", [score_math, score_choice])
def test_a_single_string_is_rejected(score):
    with pytest.raises(ValueError, match="list of strings"):
        score("A", "A")


def test_metrics_are_finite_fractions_on_random_text():
    m = math_example_metrics("<<)(>> <<=>> #### #### -", GSM8K_REFERENCE)
    assert all(value is None or (math.isfinite(value) and 0 <= value <= 1) for value in m.values())
