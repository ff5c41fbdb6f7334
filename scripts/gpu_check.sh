#!/usr/bin/env bash
# GPU check in one call: versions and imports, the GPU tests, and the three benchmarks.
#
#   usage (repository root, on the GPU machine): bash scripts/gpu_check.sh
#
# Packages the GPU image lacks (bitsandbytes, datasets, liger-kernel, cut-cross-entropy,
# unsloth) come from .gpu-site, built here by ../shared/scripts/gpu-site.sh and carried.
# Every step runs under `timeout`; a failed step does not stop the next, and the end
# prints a summary. Results go to ${OUT:-benchmarks/results/gpu}, flat, six files:
#   gpu_check.log  loss_memory_gpu.json  autotune_gpu.json  autotune_gpu.png
#   profile_gpu.json (the largest kernels of qseg's and Liger's calls)  max_context_gpu.json
# At most 8 minutes (the sum of the timeouts). For a max_context run that converges on
# every cap, use scripts/gpu_max_context.sh in a call of its own.
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu}
committed_context=benchmarks/results/gpu/max_context_gpu.json
mkdir -p "$out"
source "$(dirname "$0")/steps.sh"

main() {
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  step env 40 python3 - <<'EOF'  # cold imports of torch and friends are slow on a fresh machine
import importlib, importlib.metadata, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "accelerate", "triton", "bitsandbytes",
             "datasets", "liger_kernel", "cut_cross_entropy", "trl", "matplotlib", "qseg"):
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None)
        print(f"{name:18} {version or importlib.metadata.version(name.replace('_', '-'))}")
    except Exception as error:  # report every failing import, keep going
        print(f"{name:18} IMPORT FAILED: {type(error).__name__}: {error}")
import torch
print("cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
EOF
  # Whether unsloth (carried in .gpu-site) imports on this image: qseg train's "auto"
  # backend takes it where it does. No hub from this machine.
  step unsloth 40 env HF_HUB_OFFLINE=1 python3 -c "from qseg.models import import_unsloth
unsloth, why = import_unsloth()
print('unsloth', unsloth.__version__ if unsloth else 'NOT USABLE: ' + why)"
  # The loss tests, torch.compile included (the unsloth model test, which compiles for
  # long on its own, is left out to fit the device time).
  step pytest_gpu 70 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_losses_gpu.py
  step loss_memory 100 python3 -m benchmarks.loss_memory --device cuda --shapes llama3 \
    --tokens 8192 --reps 5 --out "$out/loss_memory_gpu.json" --overwrite
  step autotune 70 python3 -m benchmarks.autotune --device cuda --shapes llama3 --tokens 8192 \
    --sizes 128 256 512 1024 2048 --reps 3 --out "$out/autotune_gpu.json" --overwrite
  # Where the token-wise losses' time goes against Liger's: kernels per call, device time.
  step profile 45 python3 -m benchmarks.loss_memory --device cuda --shapes llama3 --tokens 8192 \
    --impls liger qseg --losses cross_entropy focal generalized_dice --reps 3 --profile \
    --out "$out/profile_gpu.json" --overwrite
  # The search stops launching trials at --time-budget; in-flight ones end within --trial-timeout.
  # It goes on from the committed searches: on the card they were searched on, where they
  # converged, this step only rewrites them; another card starts afresh.
  local resume=()
  [ -f "$committed_context" ] && resume=(--resume "$committed_context" --resume-if-same-card)
  step max_context 115 python3 -m benchmarks.max_context --device cuda --models llama3.1-8b \
    --caps 8 12 16 24 --jobs 3 --time-budget 45 --trial-timeout 55 "${resume[@]}" \
    --out "$out/max_context_gpu.json" --overwrite

  summarize '^(target vs|\[.*\] .*within 10%)'
}

main 2>&1 | tee "$out/gpu_check.log"
rm -rf "$steps"
