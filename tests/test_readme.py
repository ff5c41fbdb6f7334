"""The README's code runs as written: the loss snippet of "The losses in your own training
code", on a plain causal LM and on its peft (LoRA) wrapper."""

from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from peft import LoraConfig, get_peft_model

from qseg.losses import loss_from_logits

README = Path(__file__).resolve().parents[1] / "README.md"


def loss_snippet() -> str:
    section = README.read_text().split("### 3. The losses in your own training code")[1]
    return section.split("```python")[1].split("```")[0]


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "peft"])
def test_the_loss_snippet_runs_and_matches_full_logits(wrap):
    vocab = len(make_byte_tokenizer())
    model = make_tiny_llama(vocab)
    if wrap:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    input_ids = torch.randint(3, vocab, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt
    namespace = {"model": model, "input_ids": input_ids, "attention_mask": attention_mask}
    namespace["labels"] = labels
    exec(loss_snippet(), namespace)

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = loss_from_logits(
        logits[:, :-1], labels[:, 1:], {"cross_entropy": 0.6, "generalized_dice": 0.4}
    )
    torch.testing.assert_close(namespace["loss"], expected, rtol=1e-5, atol=1e-6)
