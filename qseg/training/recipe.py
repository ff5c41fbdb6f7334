"""`qseg train`: LoRA / QLoRA fine-tuning with any loss mixture, inside transformers' Trainer.

Read `train` top to bottom: check the output dir, read the data, load the model, tokenize,
train, save the adapter, score a few held-out examples, write `run.json`. Everything that
can be wrong with the input fails before the first optimizer step.

The loss never materialises (B, T, V) logits: `LossTrainer.compute_loss` takes the last
hidden states from the decoder and hands them, with the lm head, to
`qseg.losses.fused_linear_loss`, which works through the vocabulary in chunks.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

import qseg
from qseg.config import TrainConfig
from qseg.data import (
    IGNORE_INDEX,
    DataCollator,
    Example,
    build_dataset,
    is_one_file,
    load_examples,
)
from qseg.eval import evaluate
from qseg.losses import fused_linear_loss, plan_chunks
from qseg.models import (
    LoadedModel,
    LoraSettings,
    backbone_hidden_states,
    check_head_gives_the_logits,
    default_model_source,
    describe,
    load_model,
    output_head,
)
from qseg.run_files import (
    CONFIG_FILE,
    EVAL_FILE,
    RUN_FILE,
    check_output_dir,
    clear_run,
    record_run_files,
    write_json,
)

log = logging.getLogger(__name__)

GiB = 1 << 30


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the record also written to `<output_dir>/run.json`.

    Under `torchrun` or `accelerate launch` every process runs this (distributed data
    parallel); only the main process writes files and scores the held-out examples.

    Raises:
        ValueError / FileNotFoundError: bad data, model, loss or output dir, before training.
    """
    state = PartialState(cpu=uses_cpu())  # one process, or one of a launched group
    output_dir = agreed_output_dir(cfg, state)
    # The main process downloads or converts first; the others then read its cache.
    with state.main_process_first():
        examples = load_examples(cfg.dataset, cfg.split, fmt=cfg.format)
        eval_examples = _held_out_examples(cfg)
        set_seed(cfg.seed)  # before LoRA init, so the adapter's starting point is reproducible
        loaded = load_model(
            cfg.model or default_model_source(),
            quantization=cfg.quantization,
            backend=cfg.backend,
            lora=LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets),
            gradient_checkpointing=uses_checkpointing(cfg),
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
        callbacks=[monitor, RecordRunFiles(output_dir), ResumeOnTheNewSchedule()],
        loss_spec=cfg.loss,
        ce_scope=cfg.ce_scope,
        chunk_size=cfg.chunk_size,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())

    _reset_peak_memory()
    start = time.perf_counter()
    result = trainer.train(
        resume_from_checkpoint=get_last_checkpoint(str(output_dir)) if cfg.resume else None
    )
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
    record["data"] = {"train_examples": len(features), "dropped_too_long": dropped}
    if state.is_main_process:
        write_json(output_dir / RUN_FILE, record)
        if evaluation is not None:
            write_json(output_dir / EVAL_FILE, evaluation)
        record_run_files(output_dir)
    return record


def uses_checkpointing(cfg: TrainConfig) -> bool:
    """cfg.gradient_checkpointing, with "auto" resolved: on wherever a GPU trains."""
    if cfg.gradient_checkpointing == "auto":
        return not uses_cpu()
    return cfg.gradient_checkpointing


def uses_cpu() -> bool:
    """True where training runs on the CPU: no CUDA or Apple GPU. Telling accelerate so
    lets `torchrun` start several CPU processes (gloo), as on GPUs."""
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


# ---------------------------------------------------------------------------- the loss


@dataclass(frozen=True)
class TargetCounts:
    """What a batch scores, after the causal shift: the normalisers of the loss terms."""

    answer_tokens: int = 0  # positions with an answer label
    sequence_tokens: int = 0  # non-pad positions (cross-entropy with ce_scope="sequence")
    samples: int = 0  # samples with at least one answer label (region losses)

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> TargetCounts:
        answer = batch["labels"][:, 1:] != IGNORE_INDEX
        return cls(
            answer_tokens=int(answer.sum()),
            sequence_tokens=int(batch["attention_mask"][:, 1:].sum()),
            samples=int(answer.any(dim=1).sum()),
        )

    def as_tuple(self) -> tuple[int, int, int]:
        return self.answer_tokens, self.sequence_tokens, self.samples

    def most(self, other: TargetCounts) -> TargetCounts:
        """The larger of each count."""
        return TargetCounts(*map(max, self.as_tuple(), other.as_tuple()))

    def __add__(self, other: TargetCounts) -> TargetCounts:
        return TargetCounts(
            self.answer_tokens + other.answer_tokens,
            self.sequence_tokens + other.sequence_tokens,
            self.samples + other.samples,
        )


def shift_left(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels of the next position: labels[:, 1:], then IGNORE_INDEX at the end."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class LossTrainer(Trainer):
    """A Trainer whose loss is a qseg loss mixture on the last hidden states and the head.

    Gradient accumulation: the Trainer hands every micro-batch the `TargetCounts` of the
    whole accumulated batch (as `num_items_in_batch`). Token-wise terms divide their sum
    by the accumulated token count and region terms weigh each micro-batch by its share
    of the accumulated samples, so the summed micro-batch losses (and their gradients)
    equal one large batch's: exactly for token-wise and per-sample region losses, and
    approximately for the batch-global Lovász (`per_sample=False`).

    Several processes (DDP, under torchrun or accelerate launch): the counts are summed
    over the processes and the loss multiplied by their number, since DDP averages the
    processes' gradients; N processes then update exactly as one with N times the batch.
    """

    # The loss is already scaled for accumulation: the Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        loss_spec: dict[str, dict[str, Any]],
        ce_scope: str = "answer",
        chunk_size: int | str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_spec = loss_spec
        self.ce_scope = ce_scope
        self.chunk_size = chunk_size
        # transformers < 5.24 has no `loss_is_scaled_for_ga` and reads this flag instead.
        self.model_accepts_loss_kwargs = True
        self.largest_batch = TargetCounts()  # the most of each count in one micro-batch
        self.largest_positions = 0  # the most (B·T) positions in one micro-batch

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, torch.Tensor]], TargetCounts]:
        """The next accumulated batch and its `TargetCounts` (instead of a token count)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        per_batch = [TargetCounts.of(batch) for batch in batches]
        self.largest_batch = functools.reduce(TargetCounts.most, per_batch, self.largest_batch)
        positions = [batch["input_ids"].numel() for batch in batches]
        self.largest_positions = max([self.largest_positions, *positions])
        counts = sum(per_batch, TargetCounts())
        if self._normalizes_across_processes():
            per_process = self.accelerator.gather(torch.tensor(counts.as_tuple(), device=device))
            counts = TargetCounts(*per_process.view(-1, 3).sum(dim=0).tolist())
        return batches, counts

    def _normalizes_across_processes(self) -> bool:
        """Whether each process divides by the whole group's counts (the Trainer's default,
        `average_tokens_across_devices`) rather than by its own."""
        return self.args.average_tokens_across_devices and self.accelerator.num_processes > 1

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: TargetCounts | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """The mixture on (hidden, labels shifted left): position t predicts token t+1.

        With ce_scope="sequence", cross-entropy scores every non-pad token (labels are the
        input ids) and the other terms the answer tokens: two passes over the head.
        The decoder runs under the accelerator's autocast, which the Trainer applies only
        to `model.forward` (bypassed here), so bf16 training keeps bf16 activations.
        """
        totals = num_items_in_batch
        if not isinstance(totals, TargetCounts):  # called outside the training loop
            totals = TargetCounts.of(inputs)
        # DDP averages the processes' gradients: with counts that cover all processes
        # (from get_batch_samples), each process's loss is scaled up by their number.
        process_scale = 1
        if totals is num_items_in_batch and self._normalizes_across_processes():
            process_scale = self.accelerator.num_processes
        with self.accelerator.autocast():
            hidden = hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
        head = output_head(self.accelerator.unwrap_model(model))
        # Shifting the labels, not the hidden states, keeps those contiguous: the loss then
        # reads them in place. The last position has no next token to score.
        answer_labels = shift_left(inputs["labels"])

        parts = []
        for scope, terms in self.loss_passes().items():
            if scope == "sequence":
                padding = inputs["attention_mask"] == 0
                labels = shift_left(inputs["input_ids"].masked_fill(padding, IGNORE_INDEX))
                part = self._fused(hidden, head, labels, terms, totals.sequence_tokens, None)
            else:
                part = self._fused(
                    hidden, head, answer_labels, terms, totals.answer_tokens, totals.samples
                )
            parts.append(part)
        loss = sum(parts[1:], parts[0]) * process_scale
        return (loss, {}) if return_outputs else loss

    def loss_passes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The mixture split by what it scores: {"sequence": cross-entropy} with
        ce_scope="sequence", and {"answer": the other terms} (every term otherwise)."""
        answer_terms = dict(self.loss_spec)
        passes = {}
        if self.ce_scope == "sequence" and "cross_entropy" in answer_terms:
            passes["sequence"] = {"cross_entropy": answer_terms.pop("cross_entropy")}
        if answer_terms:
            passes["answer"] = answer_terms
        return passes

    def chunk_plans(self, vocab: int, hidden_dim: int, dtype: torch.dtype) -> dict[str, dict]:
        """The auto-tuner's plan of each pass for the largest micro-batch trained on, the
        one that set the loss's peak memory (a smaller batch may get smaller chunks)."""
        plans = {}
        for scope, terms in self.loss_passes().items():
            tokens = getattr(self.largest_batch, f"{scope}_tokens")
            if tokens == 0:
                continue
            device = self.accelerator.device
            plan = plan_chunks(
                tokens,
                vocab,
                hidden_dim,
                dtype,
                terms,
                device=device,
                positions=max(tokens, self.largest_positions),
            )
            plans[scope] = {"scored_tokens": tokens, **plan.as_dict()}
        return plans

    def _fused(
        self,
        hidden: torch.Tensor,
        head: torch.nn.Module,
        labels: torch.Tensor,
        terms: dict[str, dict[str, Any]],
        num_tokens: int,
        num_samples: int | None,
    ) -> torch.Tensor:
        return fused_linear_loss(
            hidden,
            head,
            labels,
            terms,
            chunk_size=self.chunk_size,
            num_tokens=num_tokens,
            num_samples=num_samples,
        )


def hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """`backbone_hidden_states` (B, T, d) of `model`, which the Trainer may have wrapped in
    DistributedDataParallel. DDP averages the gradients of what runs through its own
    forward only, so the call goes through the wrapper, with the wrapped model's forward
    returning the hidden states instead of logits for that one call."""
    if not isinstance(model, DistributedDataParallel):
        return backbone_hidden_states(model, input_ids, attention_mask)
    inner = model.module
    own_forward = inner.__dict__.get("forward")  # accelerate may have wrapped it (autocast)
    inner.forward = functools.partial(backbone_hidden_states, inner)
    try:
        return model(input_ids, attention_mask)
    finally:
        if own_forward is None:
            del inner.forward
        else:
            inner.forward = own_forward


def training_arguments(cfg: TrainConfig, output_dir: Path, dtype: torch.dtype) -> TrainingArguments:
    """The TrainingArguments of a run: one log entry (the step's loss) per optimizer step."""
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,  # the collator's batch is exactly what compute_loss reads
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=cuda,
        use_cpu=uses_cpu(),
        # Every trainable weight (the LoRA adapters) gets a gradient at every step.
        ddp_find_unused_parameters=False,
    )
    return one_gpu_per_process(args)


def one_gpu_per_process(args: TrainingArguments) -> TrainingArguments:
    """A single process that sees several GPUs uses one. The Trainer would wrap the model
    in DataParallel, whose forward the loss from hidden states bypasses, and multiply the
    batch by the GPU count; several GPUs train through torchrun or accelerate launch."""
    if args.n_gpu > 1:
        log.warning(
            "%d GPUs are visible but one process trains on one; to use them all, launch "
            "`torchrun --nproc-per-node %d -m qseg train ...`",
            args.n_gpu,
            args.n_gpu,
        )
        args._n_gpu = 1  # as the Trainer itself does for a model split across GPUs
    return args


# ------------------------------------------------------------- progress and measurements


class StepMonitor(TrainerCallback):
    """Adds tokens/s (non-pad tokens since training began) and peak memory to each log."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.first_tokens = state.num_input_tokens_seen
        self.first_step = state.global_step  # > 0 when resuming
        self.tokens_per_second = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        seconds = time.perf_counter() - self.start
        tokens = state.num_input_tokens_seen - self.first_tokens
        self.tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        logs["tokens_per_s"] = round(self.tokens_per_second, 1)
        logs["peak_memory_gb"] = round(peak_memory_bytes() / GiB, 3)


class ResumeOnTheNewSchedule(TrainerCallback):
    """After --resume, the first step's learning rate from the schedule of this run.

    The optimizer comes back with the rate the checkpoint's schedule had reached: 0 at the
    end of a linear decay, when `--max-steps` grows to train on. The schedule itself is
    rebuilt for the new total (its rate functions are not saved), so one step of it, from
    the step before, gives the rate this step should have."""

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if state.global_step > 0 and isinstance(lr_scheduler, LambdaLR):
            lr_scheduler.last_epoch -= 1
            lr_scheduler.step()


class RecordRunFiles(TrainerCallback):
    """Lists the run's files after each checkpoint (see `qseg.run_dir`), so that even an
    interrupted run can be replaced with --overwrite."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record_run_files(self.output_dir)


class ProgressBar(ProgressCallback):
    """Trainer's tqdm bar, with the step logs (loss, tokens/s, memory) in its postfix."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or logs is None or "loss" not in logs:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        self.training_bar.set_postfix(
            loss=f"{logs['loss']:.4f}",
            tok_s=f"{logs.get('tokens_per_s', 0):.0f}",
            mem_gb=f"{logs.get('peak_memory_gb', 0):.2f}",
        )


def peak_memory_bytes() -> int:
    """CUDA's peak allocated memory on a GPU, else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_record(
    cfg: TrainConfig,
    loaded: LoadedModel,
    trainer: LossTrainer,
    metrics: dict[str, float],
    monitor: StepMonitor,
    train_seconds: float,
    evaluation: dict[str, Any] | None,
) -> dict[str, Any]:
    """What `run.json` holds: how the run was set up, what it did, and how it scored."""
    model = describe(loaded)
    # The loss of every optimizer step, from the Trainer's log (restored on --resume).
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    head = output_head(loaded.model)
    vocab, hidden_dim = head.weight.shape[0], head.in_features
    if cfg.chunk_size == "auto":
        chunk_plan = trainer.chunk_plans(vocab, hidden_dim, loaded.dtype)
    else:
        chunk_plan = {"rows": cfg.chunk_size}
    return {
        "qseg_version": qseg.__version__,
        "versions": library_versions(),
        "model": model["source"],
        "backend": loaded.backend,
        "quantization": loaded.quantization,
        "dtype": model["dtype"],
        "loss": cfg.loss,
        "ce_scope": cfg.ce_scope,
        "gradient_checkpointing": uses_checkpointing(cfg),
        "processes": trainer.accelerator.num_processes,
        "steps": trainer.state.global_step,
        "steps_this_run": trainer.state.global_step - monitor.first_step,
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(monitor.tokens_per_second, 1),
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss",
        "chunk_plan": chunk_plan,
        "trainer_metrics": metrics,
        "model_info": model,
        "eval": evaluation["summary"] if evaluation is not None else None,
        "config": cfg.to_dict(),
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run's results depend on (those installed); torch's
    with its build (e.g. 2.11.0+cu130), which the package metadata may leave out."""
    versions = {"torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "unsloth"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# ------------------------------------------------------------------ inputs and outputs


def agreed_output_dir(cfg: TrainConfig, state: PartialState) -> Path:
    """`check_output_dir` in every process, before any of them writes; then the main
    process's choice for all (a default runs/<time> name may differ by a second)."""
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
        return load_examples(cfg.dataset, cfg.eval_split, fmt=cfg.format, limit=cfg.eval_samples)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f"cannot read {cfg.eval_samples} held-out examples from split {cfg.eval_split!r} of "
            f"{cfg.dataset}: {err}. Pass --eval-samples 0 to skip the evaluation, or name "
            f"another split in the config (eval_split)"
        ) from err
