"""The `qseg` command: `qseg train`, `qseg eval`, `qseg compare`.

`qseg` alone, or `qseg train` alone, runs the default job (see `qseg.config.TrainConfig`);
`qseg --max-steps 4` is `qseg train --max-steps 4`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qseg import __version__
from qseg.compare import add_compare_arguments, run_compare
from qseg.config import PRESETS, resolve_config
from qseg.constants import BACKENDS, CE_SCOPES, FORMATS, QUANTIZATIONS
from qseg.data import is_one_file
from qseg.eval import add_eval_arguments, format_table, run_eval
from qseg.losses import available_losses

SUBCOMMANDS = ("train", "eval", "compare")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qseg` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        parser.error(f"unknown command '{argv[0]}'; {hint}commands: {', '.join(SUBCOMMANDS)}")
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "train")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand, with its own usage
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    # Under torchrun / accelerate launch (RANK set) the other processes log warnings only.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"qseg {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qseg",
        description="Segmentation losses for (Q)LoRA fine-tuning of language models.",
    )
    parser.add_argument("--version", action="version", version=f"qseg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{train,eval,compare}")

    train = commands.add_parser(
        "train",
        help="fine-tune a LoRA adapter (the default command)",
        description="Fine-tune a LoRA adapter with a loss mixture. Without flags: a short "
        "run of SmolLM2-135M-Instruct on a GSM8K sample, a few minutes on a CPU.",
    )
    add_train_arguments(train)
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser(
        "eval",
        help="generate answers and score them",
        description="Generate answers greedily and score them: an adapter of a qseg run "
        "(--adapter), or a base model alone (--model) as the baseline.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=run_eval)

    compare = commands.add_parser(
        "compare",
        help="table and chart of several runs' scores",
        description="Set the scores of qseg runs and `qseg eval` reports side by side: a "
        "markdown table and a bar chart.",
    )
    add_compare_arguments(compare)
    compare.set_defaults(run=run_compare)
    parser.subcommands = {"train": train, "eval": evaluate, "compare": compare}
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `qseg train` flags. Only the flags given reach the config (they override the
    YAML file, which overrides the preset, which overrides the defaults)."""
    add = parser.add_argument_group("settings").add_argument
    parser.set_defaults(config_file=None)  # outside the settings: not a TrainConfig field
    parser.add_argument(
        "--config", dest="config_file", metavar="YAML", help="YAML file of settings"
    )
    add("--preset", choices=sorted(PRESETS), help="the paper's setup for a dataset")
    add("--model", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
    add(
        "--dataset",
        help="gsm8k | mathqa | openbookqa | hellaswag | gsm8k-sample (default), a hub id, "
        "or a local .jsonl/.json/.parquet file or folder of split files",
    )
    add("--split", help="training split (default: train)")
    add("--format", choices=FORMATS, help="GSM8K answers: calculator steps or full rationale")
    add(
        "--loss",
        help="comma-separated name[:weight][:param=value...], e.g. cross_entropy:0.6,lovasz:0.4 "
        f"or focal:1:gamma=3, or a JSON object; names: {', '.join(available_losses())}",
    )
    add("--ce-scope", choices=CE_SCOPES, help="cross-entropy on the answer or the whole sequence")
    add("--chunk-size", type=_chunk_size, help="rows per loss chunk, or auto (default)")
    add("--max-steps", type=int, help="optimizer steps (default 30; see --epochs)")
    add("--epochs", type=float, help="epochs, when --max-steps is not given")
    add("--batch-size", type=int, help="examples per micro-batch")
    add("--grad-accum", type=int, help="micro-batches per optimizer step")
    add("--lr", type=float, help="peak learning rate")
    add("--warmup-steps", type=int, help="linear warmup steps")
    add("--weight-decay", type=float, help="AdamW weight decay")
    add("--max-length", type=int, help="longest tokenized example; prompts are cut from the left")
    add("--lora-r", type=int, help="LoRA rank")
    add("--lora-alpha", type=int, help="LoRA alpha")
    add("--lora-dropout", type=float, help="LoRA dropout")
    add("--lora-targets", help="comma-separated module names, or all-linear")
    add(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute activations in the backward (default: on a GPU, not on a CPU)",
    )
    add("--quantization", choices=QUANTIZATIONS, help="4bit (NF4) or none; auto: 4bit on CUDA")
    add("--backend", choices=BACKENDS, help="auto: unsloth where it runs, else transformers")
    add("--output-dir", help="where the run goes (default: runs/<timestamp>)")
    add("--resume", action="store_true", help="continue the run in --output-dir")
    add("--overwrite", action="store_true", help="replace the run in --output-dir")
    add("--save-steps", type=int, help="checkpoint every N optimizer steps")
    add("--seed", type=int, help="random seed")
    add("--eval-samples", type=int, help="held-out examples scored after training (0: none)")
    # Only the flags given should override lower layers: leave the others out of args.
    for action in parser._actions:
        if action.dest not in ("help", "config_file"):
            action.default = argparse.SUPPRESS


def run_train(args: argparse.Namespace) -> int:
    """`qseg train`: resolve the config, train, print where the results are."""
    # Imported here: transformers' Trainer, peft and bitsandbytes take seconds to import,
    # which `qseg --help` and `qseg compare` should not wait for.
    from accelerate import PartialState

    from qseg.train import train

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config_file")}
    cfg = resolve_config(flags, args.config_file)
    record = train(cfg)
    if PartialState().is_main_process:  # under torchrun / accelerate launch: print once
        print(summary(record))
    return 0


# What "next:" suggests trying: the first whose loss the run did not use.
OTHER_LOSSES = (("focal:1:gamma=3", "focal"), ("cross_entropy:0.6,lovasz:0.4", "lovasz"))


def summary(record: dict[str, Any]) -> str:
    """What a user reads after training: the result, where it is, and what to try next."""
    out = record["output_dir"]
    losses = record["losses"]
    lines = [
        "",
        f"trained {_steps(record)} of {record['model']} ({record['backend']}, "
        f"{record['quantization']}) in {record['train_seconds']:.0f} s, "
        f"{record['tokens_per_second']:.0f} tokens/s, "
        f"peak memory {record['peak_memory_bytes'] / 2**30:.2f} GiB",
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no optimizer step was taken",
    ]
    if record["eval"] is not None:
        lines += ["", f"held-out evaluation ({out}/eval.json):", format_table(record["eval"])]
    run, config = shlex.quote(out), shlex.quote(str(Path(out) / "config.yaml"))
    loss, name = next((spec, name) for spec, name in OTHER_LOSSES if name not in record["loss"])
    other = shlex.quote(f"{out}-{name}")
    # A run trained on one file has no held-out split to score: the user names one.
    test_data = " --dataset TEST_FILE" if is_one_file(record["config"]["dataset"]) else ""
    next_steps = {
        "score more held-out problems": f"qseg eval --adapter {run}{test_data} --limit 50",
        # the same run (its saved config) with only the loss changed
        "train with another loss": (
            f"qseg train --config {config} --loss {loss} --output-dir {other}"
        ),
        "compare the two runs": f"qseg compare {run} {other}",
    }
    if record["peak_memory_kind"] == "cuda_max_allocated":  # days of training on a CPU
        next_steps["the paper's GSM8K recipe"] = "qseg train --preset paper-gsm8k"
    lines += [
        "",
        f"adapter: {out}  (load with PeftModel.from_pretrained(base_model, {str(out)!r}))",
        f"record:  {Path(out) / 'run.json'}",
        "",
        "next:",
        *(f"  {what + ':':<30} {command}" for what, command in next_steps.items()),
    ]
    return "\n".join(lines)


def _steps(record: dict[str, Any]) -> str:
    """'30 steps', or after --resume '3 steps (1 in this run)': time and tokens/s are this
    run's."""
    steps, now = record["steps"], record["steps_this_run"]
    text = f"{steps} step{'' if steps == 1 else 's'}"
    return text if now == steps else f"{text} ({now} in this run)"


def _chunk_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of rows or 'auto', got {text!r}"
        ) from None
