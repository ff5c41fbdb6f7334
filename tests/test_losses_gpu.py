"""qseg.losses on CUDA: the compiled elementwise kernels and the chunk budget.

Skipped without a CUDA device (CI has none); `scripts/gpu_check.sh` runs them on a GPU.
"""

import pytest
import torch
from loss_reference import reference_loss

from qseg.losses import available_losses, engine, fused_linear_loss, normalize_losses, plan_chunks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def batch(dtype, n=4, t=96, d=64, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) / d**0.5
    labels = torch.randint(0, vocab // 10, (n, t), generator=g)
    labels[:, : t // 4] = -100
    cuda = {"device": "cuda", "dtype": dtype}
    return (
        hidden.to(**cuda).requires_grad_(),
        weight.to(**cuda).requires_grad_(),
        labels.cuda(),
        hidden,
        weight,
    )


@pytest.mark.parametrize("name", available_losses())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(name, dtype):
    hidden, weight, labels, h64, w64 = batch(dtype)
    loss = fused_linear_loss(hidden, weight, labels, name, chunk_size=100)
    loss.backward()
    h64.requires_grad_()
    expected = reference_loss(h64 @ w64.T, labels.cpu(), normalize_losses(name))
    expected.backward()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(loss.double().cpu(), expected, **tol)
    grad_scale = h64.grad.abs().max()
    torch.testing.assert_close(
        hidden.grad.double().cpu() / grad_scale, h64.grad / grad_scale, **tol
    )
    assert engine.uses_compiled_kernels(hidden.device), "torch.compile failed on this GPU"


@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_auto_chunks_stay_within_their_budget(ignored):
    """Peak added memory: the hidden-state gradient, written in place by the engine, plus at
    most one chunk's budget (with or without ignored positions to gather around)."""
    n, d, vocab = 8192, 1024, 32000
    hidden = torch.randn(1, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16) / d**0.5
    labels = torch.randint(0, vocab, (1, n), device="cuda")
    labels[torch.rand(labels.shape, device="cuda") < ignored] = -100
    budget = 64 << 20
    plan = plan_chunks(
        n, vocab, d, torch.bfloat16, "cross_entropy", device="cuda", chunk_memory=budget
    )
    assert plan.rows < n  # the budget forces several chunks
    fused_linear_loss(hidden, weight, labels, "cross_entropy", chunk_memory=budget).backward()
    hidden.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fused_linear_loss(hidden, weight, labels, "cross_entropy", chunk_memory=budget).backward()
    added = torch.cuda.max_memory_allocated() - start
    grad_bytes = hidden.numel() * hidden.element_size()
    assert added <= grad_bytes + budget, (added, grad_bytes, plan)


@pytest.mark.parametrize("name", ["cross_entropy", "generalized_dice"])
def test_one_half_precision_chunk_buffer_beyond_the_gradients(name):
    """The compiled kernels write the logit gradient over the logits: besides the gradients
    themselves, forward+backward holds one (rows, V) bf16 buffer and small change."""
    n, d, vocab, rows = 4096, 1024, 32000, 1024
    hidden = torch.randn(1, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16) / d**0.5
    weight.requires_grad_()
    labels = torch.randint(0, 50, (1, n), device="cuda")  # 50 classes present at most
    labels[:, ::10] = -100
    for _ in range(2):  # the first call compiles
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fused_linear_loss(hidden, weight, labels, name, chunk_size=rows).backward()
        added = torch.cuda.max_memory_allocated() - start
    gradients = (hidden.numel() + weight.numel()) * 2
    chunk = rows * vocab * 2
    # region losses also hold (n, 50) float32 log-probabilities, their gradient, etc.
    small = 16 << 20  # a second chunk buffer would be 62.5 MiB
    assert engine.uses_compiled_kernels(hidden.device)
    assert added <= gradients + chunk + small, (added - gradients) / chunk
