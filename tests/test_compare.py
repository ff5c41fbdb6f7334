import argparse
import json

import pytest

from qseg.cli import add_compare_arguments
from qseg.compare import (
    BASELINE_LABEL,
    legend_labels,
    load_result,
    loss_label,
    markdown_table,
    run_compare,
)
from qseg.losses import normalize_losses
from qseg.run_files import read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def summary(exact_match: float, step_iou: float, calc_errors: float) -> dict:
    return {
        "dataset": "gsm8k",
        "n": 5,
        "n_with_steps": 5,
        "exact_match": exact_match,
        "step_iou": step_iou,
        "calc_errors": calc_errors,
    }


def write_run(directory, loss, eval_summary=None):
    directory.mkdir()
    config = {"model": "m", "dataset": "gsm8k", "eval_split": "test", "loss": loss}
    run = {"qseg_run": True, "config": config}
    if eval_summary is not None:
        run["eval"] = eval_summary
    (directory / "run.json").write_text(json.dumps(run))
    return directory


def compare_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def two_runs(tmp_path):
    ce = write_run(tmp_path / "ce", {"cross_entropy": {"weight": 1.0}}, summary(0.2, 0.5, 0.1))
    mix = {"cross_entropy": {"weight": 0.6}, "generalized_dice": {"weight": 0.4}}
    gdice = write_run(tmp_path / "gdice", mix, summary(0.4, 0.3, 0.0))
    return ce, gdice


def test_loss_label():
    canonical = {"cross_entropy": {"weight": 0.6}, "focal": {"weight": 0.4, "gamma": 3.0}}
    assert loss_label(canonical) == "cross_entropy:0.6,focal:0.4:gamma=3"
    assert loss_label({"cross_entropy": 0.6, "generalized_dice": 0.4}) == (
        "cross_entropy:0.6,generalized_dice:0.4"
    )
    # Parameters at their defaults (as qseg.losses.normalize_losses fills them in) are left out.
    defaults = normalize_losses({"cross_entropy": 0.6, "generalized_dice": 0.4})
    assert loss_label(defaults) == "cross_entropy:0.6,generalized_dice:0.4"
    assert loss_label({"mystery": {"weight": 1.0, "k": 2}}) == "mystery:1:k=2"
    assert loss_label("lovasz") == "lovasz"
    assert loss_label(None) == "unknown loss"


def test_compare_two_runs_writes_table_and_chart(two_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_compare(compare_args(*map(str, two_runs), "--output-dir", str(out))) == 0

    table = (out / "compare.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| run | loss | dataset | n | exact_match | step_iou | calc_errors |"
    # The best value per metric is bold; lower is better for calc_errors.
    assert lines[2] == "| ce | cross_entropy:1 | gsm8k | 5 | 0.200 | **0.500** | 0.100 |"
    assert lines[3] == (
        "| gdice | cross_entropy:0.6,generalized_dice:0.4 | gsm8k | 5 "
        "| **0.400** | 0.300 | **0.000** |"
    )
    assert "lower is better for calc_errors" in table
    assert table in capsys.readouterr().out

    png = (out / "compare.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000


def test_compare_accepts_an_eval_report_as_baseline(two_runs, tmp_path):
    report = tmp_path / "baseline.json"
    base = {"summary": summary(0.0, 0.1, 0.5), "examples": [], "setup": {"adapter": None}}
    report.write_text(json.dumps(base))
    result = load_result(report)
    assert (result.name, result.label) == ("baseline", BASELINE_LABEL)

    table = markdown_table([result, *map(load_result, two_runs)])
    assert "| baseline | base model (no adapter) | gsm8k | 5 | 0.000 | 0.100 | 0.500 |" in table


def test_results_of_different_sizes_are_compared_with_a_warning(two_runs, tmp_path, capsys):
    report = tmp_path / "base.json"
    summary_50 = {**summary(0.0, 0.1, 0.5), "n": 50}
    report.write_text(json.dumps({"summary": summary_50, "setup": {"adapter": None}}))
    argv = [*map(str, two_runs), str(report), "--output-dir", str(tmp_path / "out")]
    assert run_compare(compare_args(*argv)) == 0
    assert "different numbers of examples (ce: 5, gdice: 5, base: 50)" in capsys.readouterr().err


def test_results_that_score_different_data_are_compared_with_a_warning(two_runs, tmp_path, capsys):
    report = tmp_path / "other.json"
    setup = {"adapter": "runs/x", "loss": "focal", "dataset": "data/train.jsonl", "split": "test"}
    report.write_text(json.dumps({"summary": summary(0.0, 0.1, 0.5), "setup": setup}))
    argv = [*map(str, two_runs), str(report), "--output-dir", str(tmp_path / "out")]
    assert run_compare(compare_args(*argv)) == 0
    warning = "score different data (ce: gsm8k test, gdice: gsm8k test, other: data/train.jsonl"
    assert warning in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a file; choose a folder"):
        run_compare(compare_args(*map(str, two_runs), "--output-dir", str(report)))


def test_a_run_json_path_reads_its_run(two_runs):
    result = load_result(two_runs[1] / "run.json")
    assert (result.name, result.summary["exact_match"]) == ("gdice", 0.4)


def test_a_run_given_twice_is_shown_once(two_runs, tmp_path, capsys):
    ce, gdice = map(str, two_runs)
    argv = [ce, gdice, f"{ce}/run.json", ce + "/", "--output-dir", str(tmp_path / "out")]
    assert run_compare(compare_args(*argv)) == 0
    table = (tmp_path / "out" / "compare.md").read_text()
    rows = [line.split(" | ")[0] for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows == ["| ce", "| gdice"]
    err = capsys.readouterr().err
    assert f"{ce}/run.json is {ce} again" in err and f"{ce}/ is {ce} again" in err


def test_runs_sharing_a_loss_are_told_apart_in_the_chart_legend(tmp_path):
    a = load_result(write_run(tmp_path / "a", "focal", summary(0.1, 0.1, 0.1)))
    b = load_result(write_run(tmp_path / "b", "focal", summary(0.2, 0.2, 0.2)))
    assert legend_labels([a, b]) == ["focal (a)", "focal (b)"]


def test_compare_names_every_run_without_eval_results(two_runs, tmp_path):
    bare1 = write_run(tmp_path / "bare1", "focal")
    bare2 = write_run(tmp_path / "bare2", "lovasz")
    args = compare_args(str(two_runs[0]), str(bare1), str(bare2), "--output-dir", str(tmp_path))
    with pytest.raises(ValueError) as error:
        run_compare(args)
    message = str(error.value)
    assert "bare1" in message and "bare2" in message and "ce has" not in message
    assert "qseg train --eval-samples N" in message and "qseg eval --adapter" in message
    assert not (tmp_path / "compare.md").exists()


def test_compare_refuses_to_overwrite(two_runs, tmp_path):
    (tmp_path / "compare.md").write_text("mine")
    args = compare_args(*map(str, two_runs), "--output-dir", str(tmp_path))
    with pytest.raises(ValueError, match="--overwrite"):
        run_compare(args)
    assert (tmp_path / "compare.md").read_text() == "mine"
    args.overwrite = True
    assert run_compare(args) == 0
    assert (tmp_path / "compare.md").read_text().startswith("| run |")


def test_read_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a qseg run dir"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_run(tmp_path)


def test_a_json_file_that_is_not_a_report_is_rejected(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a qseg eval report"):
        load_result(path)


def test_the_report_train_saves_beside_run_json_is_labelled_by_the_run(two_runs, tmp_path):
    ce = two_runs[0]
    (ce / "eval.json").write_text(json.dumps({"summary": summary(0.2, 0.5, 0.1), "examples": []}))
    result = load_result(ce / "eval.json")
    assert (result.name, result.label) == ("ce", "cross_entropy:1")
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps({"summary": summary(0.2, 0.5, 0.1)}))
    assert load_result(loose).label == "unknown loss"


def test_ties_and_lone_runs_are_not_bold(tmp_path):
    a = load_result(write_run(tmp_path / "a", "focal", summary(0.5, 0.5, 0.0)))
    b = load_result(write_run(tmp_path / "b", "dice", summary(0.5, 0.2, 0.0)))
    c = load_result(write_run(tmp_path / "c", "dice", summary(0.1, 0.1, 0.1) | {"dataset": "x"}))
    rows = markdown_table([a, b, c]).splitlines()[2:5]
    assert rows == [
        "| a | focal | gsm8k | 5 | 0.500 | **0.500** | 0.000 |",
        "| b | dice | gsm8k | 5 | 0.500 | 0.200 | 0.000 |",
        "| c | dice | x | 5 | 0.100 | 0.100 | 0.100 |",
    ]


def test_compare_takes_free_text_reports(tmp_path):
    """Reports of `qseg eval` on users' own data (exact match and token F1) compare too."""
    paths = []
    for name, em, f1 in (("ce", 0.25, 0.5), ("lovasz", 0.5, 0.75)):
        setup = {"adapter": f"runs/{name}", "loss": {"cross_entropy": 1.0}, "dataset": "qa.jsonl"}
        summary_ = {"dataset": "prompt-completion", "n": 4, "exact_match": em, "f1": f1}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"summary": summary_, "setup": setup}))
        paths.append(path)
    table = markdown_table([load_result(path) for path in paths])
    assert table.splitlines()[0] == "| run | loss | dataset | n | exact_match | f1 |"
    assert "| lovasz | cross_entropy:1 | prompt-completion | 4 | **0.500** | **0.750** |" in table
