"""`qseg train`: LoRA / QLoRA fine-tuning with any loss mixture, inside transformers' Trainer.

Read `train` top to bottom: check the output dir, read the data, load the model, tokenize,
train, save the adapter, score a few held-out examples, write `run.json`. Everything that
can be wrong with the input fails before the first optimizer step. The machinery lives
beside it: the Trainer that computes the loss from hidden states in `trainer`, what it
adds to the loop in `callbacks`, the run's record and summary in `record`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from qseg.config import TrainConfig
from qseg.data import DataCollator, Example, build_dataset, is_one_file, load_examples
from qseg.data.chat import require_template
from qseg.data.sources import read_examples
from qseg.eval import evaluate
from qseg.models import (
    LoraSettings,
    check_head_gives_the_logits,
    default_model_source,
    load_model,
    load_tokenizer,
)
from qseg.run_files import (
    CONFIG_FILE,
    EVAL_FILE,
    RUN_FILE,
    check_output_dir,
    clear_run,
    last_complete_checkpoint,
    record_run_files,
    write_json,
)
from qseg.training.callbacks import ProgressBar, RecordRunFiles, ResumeOnTheNewSchedule, StepMonitor
from qseg.training.record import reset_peak_memory, run_record
from qseg.training.safety import MarkCompleteCheckpoints, StopOnNonFinite, out_of_space, run_lock
from qseg.training.trainer import LossTrainer, training_arguments, uses_checkpointing, uses_cpu

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the record also written to `<output_dir>/run.json`.

    Under `torchrun` or `accelerate launch` every process runs this (distributed data
    parallel); only the main process writes files and scores the held-out examples.

    Args:
        cfg: the resolved config (`qseg.config.resolve_config`).

    Returns:
        The run's record (see `qseg.training.record.run_record`), with "output_dir" and
        "data" (examples trained on, and those dropped as too long).

    Raises:
        ValueError / FileNotFoundError: bad data, model, loss or output dir, before training.
    """
    state = PartialState(cpu=uses_cpu())  # one process, or one of a launched group
    output_dir = agreed_output_dir(cfg, state)
    # The lock is taken before anything is written: a second run into the folder stops.
    with run_lock(output_dir) if state.is_main_process else contextlib.nullcontext():
        try:
            return _train(cfg, state, output_dir)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise out_of_space(err, output_dir) from err
            raise


def _train(cfg: TrainConfig, state: PartialState, output_dir: Path) -> dict[str, Any]:
    # The main process downloads or converts first; the others then read its cache.
    with state.main_process_first():
        examples, data_info = read_examples(
            cfg.dataset,
            cfg.split,
            fmt=cfg.format,
            chat_template=cfg.chat_template,
            fields=cfg.fields,
        )
        eval_examples = _held_out_examples(cfg)
        if any(e.messages is not None and e.template for e in (*examples, *eval_examples)):
            require_template(
                load_tokenizer(cfg.model or default_model_source()),
                f"--chat-template {cfg.chat_template} renders the {data_info['layout']} rows "
                "of the data with the tokenizer's chat template",
            )
        set_seed(cfg.seed)  # before LoRA init, so the adapter's starting point is reproducible
        loaded = load_model(
            cfg.model or default_model_source(),
            quantization=cfg.quantization,
            backend=cfg.backend,
            lora=LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets),
            gradient_checkpointing=uses_checkpointing(cfg),
            offload_activations=cfg.offload_activations,
        )
    check_head_gives_the_logits(loaded.model)
    features, dropped = build_dataset(examples, loaded.tokenizer, cfg.max_length)
    if not features:
        raise ValueError(
            f"no training example of {cfg.dataset} fits max_length {cfg.max_length} "
            f"(all {dropped} answers are longer); raise --max-length"
        )

    if state.is_main_process:
        if output_dir.exists() and not cfg.resume:
            clear_run(output_dir)  # check_output_dir allowed it: a previous run, --overwrite
        output_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(output_dir / CONFIG_FILE)
        record_run_files(output_dir)
    state.wait_for_everyone()

    monitor = StepMonitor()
    trainer = LossTrainer(
        model=loaded.model,
        args=training_arguments(cfg, output_dir, loaded.dtype),
        train_dataset=features,
        data_collator=DataCollator(loaded.tokenizer.pad_token_id),
        processing_class=loaded.tokenizer,
        callbacks=[
            monitor,
            StopOnNonFinite(output_dir),
            MarkCompleteCheckpoints(),
            RecordRunFiles(output_dir),
            ResumeOnTheNewSchedule(),
        ],
        losses=cfg.loss,
        ce_scope=cfg.ce_scope,
        chunk_size=cfg.chunk_size,
    )
    trainer.remove_callback(ProgressCallback)
    progress = ProgressBar()
    trainer.add_callback(progress)

    reset_peak_memory()
    start = time.perf_counter()
    try:
        result = trainer.train(
            resume_from_checkpoint=_resume_point(output_dir) if cfg.resume else None
        )
    finally:
        progress.close()
    train_seconds = time.perf_counter() - start
    evaluation = None
    if state.is_main_process:
        loaded.model.save_pretrained(output_dir)
        loaded.tokenizer.save_pretrained(output_dir)
        if eval_examples:
            evaluation = evaluate(
                loaded.model,
                loaded.tokenizer,
                eval_examples,
                batch_size=cfg.batch_size,
                max_new_tokens=cfg.eval_max_new_tokens,
            )
    record = run_record(cfg, loaded, trainer, result.metrics, monitor, train_seconds, evaluation)
    record["output_dir"] = str(output_dir)
    record["data"] = {
        "train_examples": len(features),
        "dropped_too_long": dropped,
        **data_info,
    }
    if state.is_main_process:
        write_json(output_dir / RUN_FILE, record)
        if evaluation is not None:
            write_json(output_dir / EVAL_FILE, evaluation)
        else:  # a resumed run without evaluation: the earlier run's report is not this one's
            (output_dir / EVAL_FILE).unlink(missing_ok=True)
        record_run_files(output_dir)
    return record


def _resume_point(output_dir: Path) -> str:
    """The newest complete checkpoint, said in the log with each newer one skipped."""
    checkpoint, skipped = last_complete_checkpoint(output_dir)
    for line in skipped:
        log.warning("--resume skips %s", line)
    if checkpoint is None:  # check_output_dir has seen one; it went since
        raise ValueError(f"--resume: {output_dir} no longer holds a complete checkpoint")
    log.info("resuming from %s", checkpoint)
    return str(checkpoint)


def agreed_output_dir(cfg: TrainConfig, state: PartialState) -> Path:
    """`check_output_dir` in every process, before any of them writes; then the main
    process's choice for all (a default runs/<time> name may differ by a second).

    Args:
        cfg: the run's config.
        state: this process's accelerate state.

    Returns:
        The run's folder, the same in every process.
    """
    output_dir = check_output_dir(cfg)
    if state.num_processes > 1:
        chosen = [output_dir]
        broadcast_object_list(chosen)
        output_dir = chosen[0]
        state.wait_for_everyone()
    return output_dir


def _held_out_examples(cfg: TrainConfig) -> list[Example]:
    """The first `eval_samples` examples of the eval split, read now so that a missing
    split fails before training rather than after it."""
    if cfg.eval_samples == 0:
        return []
    if is_one_file(cfg.dataset):
        log.warning(
            "no held-out evaluation: the dataset %s is one file, without a separate %s split; "
            "score the adapter with `qseg eval --adapter DIR --dataset TEST_FILE`",
            cfg.dataset,
            cfg.eval_split,
        )
        return []
    if cfg.eval_split == cfg.split:
        log.warning(
            "the held-out examples come from the training split %r: their scores are on "
            "training data",
            cfg.split,
        )
    try:
        return load_examples(
            cfg.dataset,
            cfg.eval_split,
            fmt=cfg.format,
            limit=cfg.eval_samples,
            chat_template=cfg.chat_template,
            fields=cfg.fields,
        )
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f"cannot read {cfg.eval_samples} held-out examples from split {cfg.eval_split!r} of "
            f"{cfg.dataset}: {err}. Pass --eval-samples 0 to skip the evaluation, or name "
            f"another split in the config (eval_split)"
        ) from err
