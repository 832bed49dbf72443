"""Compiles pyvf's Triton kernels for a GPU target without a GPU (ahead of time, to
PTX and cubin with Triton's bundled ptxas), so CI on CPU-only machines catches a
kernel that would no longer compile. The interpreter, which CI also runs, executes
the same code but does not type-check it the way the compiler does.

    python -m pyvf.kernels.triton.compile_check [--arch 90] [--all-configs]

Must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time


# Shapes whose constexpr loop bounds the check compiles with: Qwen3-8B's hidden size
# and vocabulary (the forward's V_PER_SPLIT is the whole vocabulary rounded up to 256).
_H = 4096
_V = 151936
_V_PER_SPLIT = 152064


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    pointer_types = {
        "h_ptr": dtype, "w_ptr": dtype, "dz_ptr": dtype, "z_ptr": dtype, "tgt_ptr": "i64",
    }
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_types.get(name, "fp32")
        elif name == "inv_temp":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET; the interpreter compiles nothing", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pyvf.kernels.triton import policy_loss as pl
    from pyvf.kernels.triton import token_logprobs as k

    kernels = {"_forward_kernel": k._forward_kernel, "_logits_grad_kernel": k._logits_grad_kernel}
    configs = {"_forward_kernel": k._FWD_CONFIGS, "_logits_grad_kernel": k._BWD_CONFIGS}
    shape = {"_forward_kernel": dict(H=_H, V_PER_SPLIT=_V_PER_SPLIT), "_logits_grad_kernel": dict(H=_H)}
    target = GPUTarget("cuda", args.arch, 32)
    count = 0
    start = time.time()
    dtypes = (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"))
    for name, kernel in kernels.items():
        fn = kernel.fn  # the JITFunction under the autotuner
        for dtype, torch_name in dtypes:
            chosen = configs[name] if (args.all_configs or dtype == "bf16") else configs[name][:1]
            for config in chosen:
                for with_entropy in (False, True):
                    constexprs = dict(config.kwargs, **shape[name], WITH_ENTROPY=with_entropy,
                                      PRECISION="ieee" if dtype == "fp32" else "tf32")
                    src = ASTSource(fn, _signature(fn.fn, dtype, constexprs), constexprs=constexprs)
                    triton.compile(src, target=target,
                                   options={"num_warps": config.num_warps, "num_stages": config.num_stages})
                    count += 1
            print(f"compile_check: {name} {torch_name} ok ({len(chosen)} configs x entropy on/off)", flush=True)

    # policy_loss's row kernel: one fixed config, every combination of its switches.
    fn = pl._policy_rows_kernel
    for dtype, torch_name in dtypes:
        for need_grad in (False, True):
            for with_entropy_grad in (False, True):
                constexprs = dict(V=_V, NEED_GRAD=need_grad, WITH_ENTROPY_GRAD=with_entropy_grad,
                                  BLOCK_V=pl.ROW_BLOCK_V)
                src = ASTSource(fn, _signature(fn.fn, dtype, constexprs), constexprs=constexprs)
                triton.compile(src, target=target, options={"num_warps": pl.ROW_WARPS, "num_stages": 1})
                count += 1
        print(f"compile_check: _policy_rows_kernel {torch_name} ok (grad x entropy grad on/off)", flush=True)
    print(f"compile_check: {count} kernels compiled for sm_{args.arch} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
