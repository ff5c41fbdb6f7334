"""The README's code runs as written: the snippets of "The losses in your own training
code" (the patch and the fused loss), on a plain causal LM and on its peft (LoRA) wrapper."""

from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama
from peft import LoraConfig, get_peft_model

from qseg.losses import loss_from_logits

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(containing: str) -> str:
    """The python block of "The losses in your own training code" that uses `containing`."""
    section = README.read_text().split("### 3. The losses in your own training code")[1]
    blocks = [block.split("```")[0] for block in section.split("```python")[1:]]
    return next(block for block in blocks if containing in block)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("uses", ["fused_linear_loss", "patch_model"])
def test_the_loss_snippet_runs_and_matches_full_logits(wrap, uses):
    vocab = len(make_byte_tokenizer())
    model = make_tiny_llama(vocab)
    if wrap:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    input_ids = torch.randint(3, vocab, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    namespace = {"model": model, "input_ids": input_ids, "attention_mask": attention_mask}
    namespace["labels"] = labels
    exec(snippet(uses), namespace)

    expected = loss_from_logits(
        logits[:, :-1], labels[:, 1:], {"cross_entropy": 0.6, "generalized_dice": 0.4}
    )
    torch.testing.assert_close(namespace["loss"], expected, rtol=1e-5, atol=1e-6)
