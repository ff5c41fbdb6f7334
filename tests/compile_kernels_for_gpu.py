"""Compile the Triton programs of qseg.losses for a GPU, on any machine, and check them.

Triton's NVIDIA backend (ptxas included) ships in the triton wheel, so the programs can
be compiled to a cubin without a GPU: what the interpreter cannot see (a global that is
not a constexpr, a construct the compiler rejects, registers spilled to the stack) shows
up here, before a GPU is lent. Run in a process where TRITON_INTERPRET is not set:

    python tests/compile_kernels_for_gpu.py [--arch 90]

Prints one line per variant with ptxas's resource usage; exits 1 on a failed compile or
a variant that spills (a non-zero STACK).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qseg.losses import triton_kernels
from qseg.losses.kernels import launch_config

VOCAB = 128256  # Llama 3's: the widest block the launcher picks
FLOATS = "grad_scale logit_scale softcap ce_weight smoothing focal_weight focal_gamma"
FLOATS += " sadl_weight sadl_alpha sadl_gamma z_weight"
SCALARS = {"row_stride": "i32", "V": "i32", "ignore_index": "i32"}
SCALARS.update({name: "fp32" for name in FLOATS.split()})
TOKEN_FLAGS = ("HAS_CAP", "HAS_ROW_WEIGHTS", "HAS_SMOOTHING", "HAS_FOCAL", "HAS_SADL")


def variants():
    """(name, program, pointer types, constexprs): the widest and the plainest of each."""
    token = triton_kernels.token_pass_kernel
    pointers = {"labels_ptr": "*i64", "row_weights_ptr": "*fp32", "loss_ptr": "*fp32"}
    pointers["lse_ptr"] = "*fp32"
    every = dict.fromkeys(TOKEN_FLAGS, True)
    none = dict.fromkeys(TOKEN_FLAGS, False)
    yield "token all terms, bf16", token, {"logits_ptr": "*bf16", **pointers}, every, True
    yield "token ce, fp32", token, {"logits_ptr": "*fp32", **pointers}, none, True
    yield "token all terms no grad, fp16", token, {"logits_ptr": "*fp16", **pointers}, every, False
    lse = triton_kernels.row_logsumexp_kernel
    pointers = {"exclude_ptr": "*u8", "lse_ptr": "*fp32", "rest_lse_ptr": "*fp32"}
    for flag in (True, False):
        flags = {"HAS_CAP": flag, "HAS_EXCLUDE": flag}
        yield f"logsumexp cap+exclude={flag}", lse, {"logits_ptr": "*bf16", **pointers}, flags, None
    softmax = triton_kernels.scaled_softmax_kernel
    pointers = {"origin_ptr": "*fp32", "row_scale_ptr": "*fp32"}
    for flag in (True, False):
        types = {"logits_ptr": "*bf16", **pointers}
        yield f"scaled softmax cap={flag}", softmax, types, {"HAS_CAP": flag}, None


def compile_variant(program, pointers, flags, write_grad, arch):
    block, warps = launch_config(VOCAB)
    constexprs = {**flags, "BLOCK": block}
    if write_grad is not None:
        constexprs["WRITE_GRAD"] = write_grad
    signature = {}
    for name in program.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name) or SCALARS[name]
    names = list(signature)
    source = ASTSource(
        fn=program,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(source, target=target, options={"num_warps": warps})


def resource_usage(cubin: bytes) -> str | None:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    lines = [line.strip() for line in out.splitlines() if "REG:" in line]
    return lines[0] if lines else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="sm_ version (default 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted programs do not compile")
        return 2
    failed = False
    for name, program, pointers, flags, write_grad in variants():
        try:
            kernel = compile_variant(program, pointers, flags, write_grad, args.arch)
        except Exception as error:  # noqa: BLE001 - report every variant
            print(f"FAILED {name}: {type(error).__name__}: {error}")
            failed = True
            continue
        usage = resource_usage(kernel.asm["cubin"])
        spills = usage is not None and not re.search(r"\bSTACK:0\b", usage)
        failed |= spills
        print(f"{'SPILLS' if spills else 'ok'} {name}: {usage or 'compiled (no cuobjdump)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
