"""qseg.patch_model: the patched model's loss is the qseg mixture, exactly, in plain calls,
with peft, under transformers' Trainer (gradient accumulation) and under TRL's SFTTrainer."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import qseg
from qseg.losses import loss_from_logits

TOKEN_WISE = {"cross_entropy": 0.6, "focal": {"weight": 0.4, "gamma": 2.0}}
REGION = {"cross_entropy": 0.6, "lovasz": 0.4}
VOCAB = 50


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows, one right-padded, prompts and one more position ignored."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    labels[1, 6] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference(model, inputs, losses, ce_scope="answer"):
    """The mixture on the unpatched model's full logits (float64)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    if ce_scope == "answer":
        return loss_from_logits(logits[:, :-1], inputs["labels"][:, 1:], losses)
    others = {k: v for k, v in losses.items() if k != "cross_entropy"}
    sequence = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    ce = loss_from_logits(
        logits[:, :-1], sequence[:, 1:], {"cross_entropy": losses["cross_entropy"]}
    )
    return ce + loss_from_logits(logits[:, :-1], inputs["labels"][:, 1:], others)


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("ce_scope", ["answer", "sequence"])
@pytest.mark.parametrize("losses", [TOKEN_WISE, REGION], ids=["token-wise", "region"])
def test_patched_loss_and_gradients_equal_full_logits(losses, ce_scope):
    model = make_tiny_llama(VOCAB).double()
    inputs = batch()
    expected = reference(model, inputs, losses, ce_scope)
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad()

    qseg.patch_model(model, losses, ce_scope=ce_scope, chunk_size=5)
    output = model(**inputs)
    assert output.logits is None
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=1e-6)
    output.loss.backward()
    for got, want in zip(grads(model), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_call_without_labels_is_the_unpatched_forward_and_unpatch_restores():
    model = make_tiny_llama(VOCAB)
    inputs = batch()
    before = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    original_class = type(model)
    assert qseg.patch_model(model, REGION) is model
    assert type(model).__name__ == original_class.__name__
    after = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    generated = model.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)

    qseg.unpatch_model(model)
    assert type(model) is original_class
    unpatched = model(**inputs)
    assert unpatched.logits is not None and torch.isfinite(unpatched.loss)
    with pytest.raises(ValueError, match="not patched"):
        qseg.unpatch_model(model)


@pytest.mark.parametrize("patch_the", ["peft model", "base before peft"])
def test_peft_models_either_way(patch_the):
    base = make_tiny_llama(VOCAB).double()
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inputs = batch()
    if patch_the == "peft model":
        model = get_peft_model(base, config)
        expected = reference(model, inputs, REGION)
        qseg.patch_model(model, REGION)
    else:
        qseg.patch_model(base, REGION)
        model = get_peft_model(base, config)
        qseg.unpatch_model(model)
        expected = reference(model, inputs, REGION)
        qseg.patch_model(model, REGION)
    expected.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    expected_grads = [p.grad.clone() for p in lora]
    model.zero_grad()
    loss = model(**inputs).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    for p, want in zip(lora, expected_grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_one_line_errors():
    model = make_tiny_llama(VOCAB)
    for kwargs, message in [
        ({"losses": "nope"}, "unknown loss"),
        ({"losses": "ce", "ce_scope": "all"}, "ce_scope must be one of answer, sequence"),
        ({"losses": "ce", "chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"losses": "ce", "chunk_memory": -1}, "chunk_memory must be a positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            qseg.patch_model(model, **kwargs)
    with pytest.raises(ValueError, match="not a causal language model"):
        qseg.patch_model(torch.nn.Linear(2, 2), "ce")
    qseg.patch_model(model, "ce")
    with pytest.raises(ValueError, match="already patched"):
        qseg.patch_model(model, "ce")
    inputs = batch()
    with pytest.raises(ValueError, match="num_items_in_batch"):
        model(**inputs, num_items_in_batch=1)


def test_packed_rows_work_for_token_wise_losses_and_are_refused_for_region_losses():
    model = make_tiny_llama(VOCAB).double()
    inputs = batch()
    # One row holding two samples of 5 tokens: positions restart at 0.
    packed = {
        "input_ids": inputs["input_ids"][:1],
        "labels": inputs["input_ids"][:1].clone(),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]),
    }
    # Without a cache, transformers reads the restarts as separate samples (block-diagonal
    # attention), as the patched forward's decoder call does.
    logits = model(
        input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
    ).logits
    expected = loss_from_logits(logits[:, :-1], packed["labels"][:, 1:], TOKEN_WISE)
    qseg.patch_model(model, TOKEN_WISE)
    torch.testing.assert_close(model(**packed).loss, expected, rtol=1e-6, atol=1e-6)
    qseg.unpatch_model(model)
    qseg.patch_model(model, REGION)
    with pytest.raises(ValueError, match="packed batches .* not supported with region losses"):
        model(**packed)


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class KeepGradients(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]


def one_step_gradients(tmp_path, batch_size: int, accumulation: int):
    model = make_tiny_llama(VOCAB)
    qseg.patch_model(model, TOKEN_WISE)
    inputs = {**batch(0)}
    more = batch(1)
    rows = [{k: torch.cat([inputs[k], more[k]])[i] for k in inputs} for i in range(4)]
    keep = KeepGradients()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Rows(rows), data_collator=collate, callbacks=[keep]
    )
    trainer.train()
    return keep.grads


def test_gradient_accumulation_equals_one_large_batch_under_the_trainer(tmp_path):
    whole = one_step_gradients(tmp_path, batch_size=4, accumulation=1)
    accumulated = one_step_gradients(tmp_path, batch_size=2, accumulation=2)
    assert whole and len(whole) == len(accumulated)
    for a, b in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trl_sft_trainer_trains_with_the_qseg_mixture(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    rows = [
        {"prompt": f"Q: {a}+{b}=", "completion": f"{a + b}</s>"}
        for a in range(10)
        for b in range(4)
    ]
    qseg.patch_model(model, REGION)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=32,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    # The loss TRL computes for a batch is the qseg mixture on that batch.
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(inputs))
        logits = model(input_ids=inputs["input_ids"]).logits
        labels = inputs["labels"]
        expected = loss_from_logits(logits[:, :-1], labels[:, 1:], REGION)
    torch.testing.assert_close(trl_loss, expected, rtol=1e-5, atol=1e-6)

    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    losses = [float(h["loss"]) for h in logged]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[6:]) < sum(losses[:6])
    # TRL's token accuracy and entropy come from the chunked pass.
    assert all(0.0 <= float(h["mean_token_accuracy"]) <= 1.0 for h in logged)
    assert all(0.0 < float(h["entropy"]) <= math.log(len(tokenizer)) + 1e-4 for h in logged)


def test_a_wrapper_assigned_later_stays_around_the_qseg_forward():
    """accelerate wraps `model.forward` (autocast) after the patch: the wrapper runs, and the
    loss is still the mixture."""
    model = make_tiny_llama(VOCAB).double()
    inputs = batch()
    expected = reference(model, inputs, REGION)
    qseg.patch_model(model, REGION)
    calls = []
    inner = model.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = wrapper
    torch.testing.assert_close(model(**inputs).loss, expected, rtol=1e-6, atol=1e-6)
    assert calls == [1]


DDP_WORKER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import make_tiny_llama
import qseg
dist.init_process_group("gloo")
rank = dist.get_rank()
model = make_tiny_llama(50).double()
qseg.patch_model(model, {{"cross_entropy": 0.6, "focal": 0.4}})
ddp = torch.nn.parallel.DistributedDataParallel(model)
torch.manual_seed(1)
ids = torch.randint(3, 50, (4, 8))
labels = ids.clone()
labels[:, :3] = -100
mine = slice(2 * rank, 2 * rank + 2)
scored = int((labels[:, 1:] != -100).sum())
ddp(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=scored).loss.mul(2).backward()
if rank == 0:
    torch.save([p.grad for p in model.parameters()], {out!r})
dist.destroy_process_group()
"""


def test_under_ddp_two_processes_update_as_one_batch(tmp_path):
    """Two processes, each with half the batch and the whole batch's token count (as the
    Trainer passes it), give the gradient of the whole batch in one process."""
    out = tmp_path / "grads.pt"
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(tests=str(Path(__file__).parent), out=str(out)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29561", str(worker)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    model = make_tiny_llama(50).double()
    qseg.patch_model(model, {"cross_entropy": 0.6, "focal": 0.4})
    torch.manual_seed(1)
    ids = torch.randint(3, 50, (4, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    model(input_ids=ids, labels=labels).loss.backward()
    for got, want in zip(torch.load(out), [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
