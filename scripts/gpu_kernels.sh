#!/usr/bin/env bash
# The fused Triton loss pass on a GPU, in one call of at most 8 minutes:
#   1. the kernel tests compiled for CUDA (the CPU runs them in Triton's interpreter) and
#      the loss tests on CUDA, whose fused path now runs on the kernels;
#   2. the loss table of the committed GPU results (llama3 head: V 128256, d 4096; 8192
#      tokens; bf16; 5 reps; every loss; naive, torch, Liger, CCE rows), with qseg on its
#      Triton kernels (impl "auto" on CUDA);
#   3. the same qseg and Liger rows with qseg on its torch pass (the default), so that
#      both qseg paths are timed against Liger on the same card in the same call;
#   4. a profile (largest kernels, device time per call) of qseg's and Liger's calls.
# Carry .gpu-site (Liger, CCE). Every step runs under `timeout`; a failed step does not
# stop the next. Results go to ${OUT:-benchmarks/results/gpu}:
#   gpu_kernels.log  loss_memory_triton_gpu.json  loss_memory_torch_pass_gpu.json
#   profile_triton_gpu.json
#
#   usage (repository root, on the GPU machine): bash scripts/gpu_kernels.sh
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
source "$(dirname "$0")/steps.sh"

main() {
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  step env 40 python3 -c "import torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))
from qseg.losses.kernels import triton_available
print('triton kernels available on cuda:', triton_available('cuda'))"
  # Each kernel variant compiles on its first launch: most of this step's time.
  step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_losses_gpu.py
  step table_triton 100 env QSEG_TRITON=1 python3 -m benchmarks.loss_memory --device cuda --shapes llama3 \
    --tokens 8192 --dtype bf16 --reps 5 --out "$out/loss_memory_triton_gpu.json" --overwrite
  step table_torch 60 env QSEG_TRITON=0 python3 -m benchmarks.loss_memory --device cuda \
    --shapes llama3 --tokens 8192 --dtype bf16 --reps 5 --impls liger qseg \
    --out "$out/loss_memory_torch_pass_gpu.json" --overwrite
  step profile 50 python3 -m benchmarks.loss_memory --device cuda --shapes llama3 \
    --tokens 8192 --dtype bf16 --impls liger qseg \
    --losses cross_entropy focal generalized_dice lovasz --reps 3 --profile \
    --out "$out/profile_triton_gpu.json" --overwrite

  summarize '^target vs'
}

main 2>&1 | tee "$out/gpu_kernels.log"
rm -rf "$steps"
