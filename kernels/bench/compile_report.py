"""Compile the dense-attention kernels ahead of time, without a GPU, and report resources.

For each autotuning config in ``_flash_triton._TABLE`` (or a subset), compiles the kernel
with Triton for a CUDA target (``sm_90a`` / ``sm_80``), runs the ``ptxas`` that ships with
Triton with ``-v`` on the PTX, and prints shared memory, registers, spill bytes and which
matrix instruction the PTX uses (``wgmma`` on Hopper, ``mma.sync`` otherwise, none for
IEEE float32). It proves that every config compiles and flags configs that spill, which is
how the config lists were chosen; which config is fastest is for the autotuner on a GPU.

    python kernels/bench/compile_report.py --arch 90 --kernels fwd --classes d128
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_KERNELS = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
# A representative head dim and dtype per tile class.
_CLASS_CASES = {
    "d64": (64, torch.bfloat16),
    "d128": (128, torch.bfloat16),
    "big": (256, torch.bfloat16),
}


def _jit_function(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_config(mod, kernel, cc, dtype, head_dim, causal, key_lengths, config):
    """Compile one kernel variant; returns a one-line report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attention_kernels.flash_attention import _block

    fn = _jit_function(getattr(mod, _KERNELS[kernel]))
    block = _block(head_dim)
    constexprs = {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_V": head_dim,
        "BLOCK_D": block,
        "BLOCK_DV": block,
        "IS_CAUSAL": causal,
        "HAS_KEY_LENGTHS": key_lengths,
        "INPUT_PRECISION": "tf32" if dtype == torch.float32 else "ieee",
        "EVEN_Q": False,
        **config.kwargs,
    }
    if not key_lengths:
        constexprs["KeyLengths"] = None
    signature = {}
    for param in fn.params:
        name = param.name
        if name == "KeyLengths":
            signature[name] = "*i64" if key_lengths else "constexpr"
        elif param.is_constexpr:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"):
            signature[name] = _PTR[dtype]
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names}
    start = time.time()
    compiled = triton.compile(
        ASTSource(fn, signature, constants),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"
        info = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=False,
        ).stderr
    finally:
        os.unlink(f.name)
    regs, spill_st, spill_ld = (
        m.group(1) if m else "?"
        for m in (
            re.search(r"Used (\d+) registers", info),
            re.search(r"(\d+) bytes spill stores", info),
            re.search(r"(\d+) bytes spill loads", info),
        )
    )
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no-mma"
    k = config.kwargs
    return (
        f"{kernel:5s} sm_{cc} {str(dtype)[6:]:8s} D{head_dim:<3d} causal={int(causal)} "
        f"M{k['BLOCK_M']:<3d} N{k['BLOCK_N']:<3d} w{config.num_warps} s{config.num_stages}: "
        f"smem {compiled.metadata.shared / 1024:6.1f} KB, "
        f"regs {regs:>3s}, spill {spill_st}/{spill_ld} B, "
        f"{mma}, {time.time() - start:.1f} s"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities: 90 (Hopper), 80")
    p.add_argument("--kernels", default="fwd,dkdv,dq", help="subset of fwd,dkdv,dq")
    p.add_argument("--classes", default="d64,d128,big", help="tile classes: d64,d128,big")
    p.add_argument("--causal", action="store_true", help="compile the causal variants")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_report: unset TRITON_INTERPRET (it compiles the real kernels)")
        return 1

    from attention_kernels.flash_attention import _load_kernels

    mod = _load_kernels(False)
    failures = 0
    for cc in (int(a) for a in args.arch.split(",")):
        arch = {90: "hopper", 80: "ampere"}.get(cc, "other")
        for cls in args.classes.split(","):
            head_dim, dtype = _CLASS_CASES[cls]
            for kernel in args.kernels.split(","):
                for config in mod._TABLE["any" if cls == "big" else arch, cls, kernel]:
                    try:
                        line = compile_config(
                            mod, kernel, cc, dtype, head_dim, args.causal, True, config
                        )
                    except Exception as exc:
                        failures += 1
                        line = (
                            f"{kernel} sm_{cc} {cls} {config}: FAILED {type(exc).__name__}: {exc}"
                        )
                    print(line, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
