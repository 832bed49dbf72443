"""Compiles every autotune config of pyvf's Triton kernels for a GPU target without a
GPU (ahead of time, to PTX and cubin with Triton's bundled ptxas) and judges the code:

- it must compile (the interpreter, which CI also runs, does not type-check);
- no register spills (ptxas' "bytes spill stores/loads", read from ptxas' own log);
- on Hopper (--arch 90, sm_90a), the tensor-core kernels at bf16/fp16 must issue
  `wgmma.mma_async` (PTX) / HGMMA (SASS, when cuobjdump is there), kept in flight
  across the K loop (some `wgmma.wait_group N` with N >= 1; a loop that only waits
  with N = 0 runs its wgmmas one after another), and ptxas must not serialize them
  (its C7511 "wgmma.mma_async instructions are serialized" note).

Each kernel is compiled with the divisibility hints the runtime would give it at the
headline shape (N=16384, H=4096, V=151936): Triton's launcher marks an integer
argument divisible by 16 and a pointer 16-byte aligned with `tt.divisibility`, and
those hints decide whether loads become 16-byte `cp.async` copies. Before judging
pyvf's kernels the check runs its detectors on three small kernels whose verdicts are
known (pipelined, serialized by a use of the accumulator inside the loop, spilling),
so a Triton or ptxas whose output it misreads fails the check instead of passing it.

    python -m pyvf.kernels.triton.compile_check [--arch 90] [--json PATH]

Exit status 1 when any config fails (each failure is listed), 2 on bad usage. Must
run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import triton
import triton.language as tl

# The headline shape the runtime values (and so the divisibility hints) are taken from:
# 16k tokens, Qwen3-8B's hidden size and vocabulary.
HEADLINE_N = 16384
HEADLINE_H = 4096
HEADLINE_V = 151936
# Multiprocessors of an H100 SXM / H200, for the forward's vocabulary split.
HOPPER_SMS = 132

_DTYPES = (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"))


@dataclass
class Verdict:
    kernel: str
    dtype: str
    config: str
    switches: str
    registers: int | None = None
    spill_bytes: int = 0          # spill stores + spill loads
    stack_bytes: int = 0
    wgmma_ptx: int = 0            # wgmma.mma_async in the PTX
    hgmma_sass: int | None = None  # HGMMA in the SASS (None: no cuobjdump)
    wait_groups: list[int] = field(default_factory=list)
    ptxas_notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _ptxas_report(log: str) -> tuple[int | None, int, int, list[str]]:
    """(registers, spill bytes, stack bytes, performance notes) from a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    notes = [line.split("Potential Performance Loss:", 1)[1].strip()
             for line in log.splitlines() if "Potential Performance Loss:" in line]
    return (int(regs.group(1)) if regs else None, sum(int(a) + int(b) for a, b in spills),
            max((int(s) for s in stack), default=0), notes)


def _hgmma_count(cubin: bytes) -> int | None:
    """HGMMA instructions in the cubin's SASS, via Triton's bundled cuobjdump (None when absent)."""
    tool = None
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - older Triton: fall back to one on PATH
        tool = shutil.which("cuobjdump")
    if not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return len(re.findall(r"\bHGMMA\.", out.stdout))


def _compile(fn, signature: dict, constexprs: dict, attrs: dict, target, num_warps: int, num_stages: int):
    """(compiled kernel, ptxas log): Triton's own ptxas run, its log captured."""
    from triton.compiler import ASTSource

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled, log.getvalue()


def judge(fn, signature: dict, constexprs: dict, attrs: dict, target, num_warps: int, num_stages: int,
          needs_wgmma: bool, verdict: Verdict) -> Verdict:
    """Compiles one kernel variant and fills verdict (problems empty when it passes)."""
    start = time.time()
    try:
        compiled, log = _compile(fn, signature, constexprs, attrs, target, num_warps, num_stages)
    except Exception as e:  # noqa: BLE001 - a compile error is this check's finding
        verdict.problems.append(f"does not compile: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        verdict.seconds = time.time() - start
        return verdict
    ptx = compiled.asm["ptx"]
    verdict.registers, verdict.spill_bytes, verdict.stack_bytes, verdict.ptxas_notes = _ptxas_report(log)
    if verdict.registers is None:
        verdict.problems.append("no ptxas -v report captured (is TRITON_DUMP_PTXAS_LOG honoured by this Triton?)")
    verdict.wgmma_ptx = ptx.count("wgmma.mma_async")
    verdict.wait_groups = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    if verdict.spill_bytes:
        verdict.problems.append(f"spills registers ({verdict.spill_bytes} bytes spill stores + loads)")
    if needs_wgmma:
        verdict.hgmma_sass = _hgmma_count(compiled.asm["cubin"])
        if verdict.wgmma_ptx == 0:
            verdict.problems.append("no wgmma.mma_async in the PTX (tensor cores through the slower mma.sync path)")
        elif verdict.hgmma_sass == 0:
            verdict.problems.append("wgmma in the PTX but no HGMMA in the SASS")
        elif not any(n >= 1 for n in verdict.wait_groups):
            verdict.problems.append("wgmma serialized by Triton: every wgmma.wait_group waits for 0 in flight")
        for note in verdict.ptxas_notes:
            if "serialized" in note:
                verdict.problems.append(f"wgmma serialized by ptxas: {note[:160]}")
    verdict.seconds = time.time() - start
    return verdict


def _signature_and_hints(fn, constexprs: dict, pointer_types: dict, runtime: dict) -> tuple[dict, dict]:
    """Triton signature and `tt.divisibility` hints of fn's arguments as the launcher
    specializes them for `runtime` (argument name -> value at the headline shape):
    pointers are 16-byte aligned (fresh torch allocations), integers get the hint when
    divisible by 16, as Triton's launcher does."""
    params = list(inspect.signature(fn).parameters)
    sig, attrs = {}, {}
    for i, name in enumerate(params):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = "*" + pointer_types.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        if name not in runtime:
            raise KeyError(f"compile_check: no headline value for {fn.__name__}'s argument {name!r}")
        value = runtime[name]
        if isinstance(value, float):
            sig[name] = "fp32"
        else:
            if value == 1:
                raise ValueError(f"compile_check: {name}=1 would be specialized to a constant; pick another value")
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


# --- the detectors' own test --------------------------------------------------------

@triton.jit
def _dot_loop(a_ptr, b_ptr, c_ptr, K: tl.constexpr, USE_ACC_IN_LOOP: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
        if USE_ACC_IN_LOOP:  # the next wgmma must wait for this one's result
            acc = acc * 0.5 + tl.sum(acc, axis=1)[:, None] * 1e-3
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


def _self_test(target) -> list[str]:
    """Runs the detectors on kernels with known verdicts; returns what they misjudged."""
    cases = [  # (name, constexprs, warps, stages, expected problem or None)
        ("pipelined", dict(K=1024, USE_ACC_IN_LOOP=False, BM=128, BN=128, BK=64), 8, 3, None),
        ("serialized", dict(K=1024, USE_ACC_IN_LOOP=True, BM=128, BN=128, BK=64), 8, 3, "serialized"),
        ("spilling", dict(K=1024, USE_ACC_IN_LOOP=False, BM=256, BN=256, BK=64), 4, 3, "spills"),
    ]
    misjudged = []
    for name, constexprs, warps, stages, expected in cases:
        sig, attrs = _signature_and_hints(_dot_loop.fn, constexprs, {"a_ptr": "bf16", "b_ptr": "bf16"}, {})
        v = judge(_dot_loop, sig, constexprs, attrs, target, warps, stages, True,
                  Verdict("_self_test", "bf16", name, ""))
        found = " | ".join(v.problems)
        if (expected is None and v.problems) or (expected is not None and expected not in found):
            misjudged.append(f"{name} kernel: expected {expected or 'no problem'}, the detectors said "
                             f"{found or 'no problem'}")
    return misjudged


# --- pyvf's kernels ---------------------------------------------------------------------

def _cases(arch: int):
    """(kernel name, jit function, config, switches, signature, constexprs, hints, dtype, needs_wgmma)
    for every autotune config of every kernel, at the headline shape."""
    import torch

    from pyvf.kernels.triton import policy_loss as pl
    from pyvf.kernels.triton import token_logprobs as k

    n, h, v = HEADLINE_N, HEADLINE_H, HEADLINE_V
    for dtype, torch_name in _DTYPES:
        element = 4 if dtype == "fp32" else 2
        per_split, splits = k.vocab_splits(n, v, HOPPER_SMS, h, element)
        chunk = k.backward_chunk(n, v, element)
        runtime = {
            "_forward_kernel": dict(N=n, V=v, stride_h=h, stride_w=h, inv_temp=1.0, N_SPLITS=splits),
            "_logits_grad_kernel": dict(N=n, V=v, stride_h=h, stride_w=h, stride_dz=chunk, inv_temp=1.0,
                                        v_start=0, V_COUNT=chunk),
        }
        shape = {"_forward_kernel": dict(H=h, V_PER_SPLIT=per_split),
                 "_logits_grad_kernel": dict(H=h, GROUP_N=k.GROUP_N)}
        kernels = {"_forward_kernel": (k._forward_jit, "forward"),
                   "_logits_grad_kernel": (k._logits_grad_jit, "logits_grad")}
        pointers = {"h_ptr": dtype, "w_ptr": dtype, "dz_ptr": dtype, "tgt_ptr": "i64"}
        # fp32 runs "ieee" (no tensor cores: wgmma has no exact-fp32 form).
        precision = "ieee" if dtype == "fp32" else "tf32"
        for name, (fn, kind) in kernels.items():
            for config in k.kernel_configs(kind, getattr(torch, torch_name)):
                for with_entropy in (False, True):
                    constexprs = dict(config.kwargs, **shape[name], WITH_ENTROPY=with_entropy, PRECISION=precision)
                    sig, attrs = _signature_and_hints(fn.fn, constexprs, pointers, runtime[name])
                    label = "x".join(str(config.kwargs[b]) for b in ("BLOCK_N", "BLOCK_V", "BLOCK_K")) + \
                        f" w{config.num_warps} s{config.num_stages}"
                    yield (name, fn, label, f"entropy={'on' if with_entropy else 'off'}", sig, constexprs, attrs,
                           dtype, config.num_warps, config.num_stages, arch >= 90 and dtype != "fp32")
        # policy_loss's row kernel: one config, every combination of its switches.
        fn = pl._policy_rows_kernel
        for need_grad in (False, True):
            for with_entropy_grad in (False, True):
                constexprs = dict(V=v, NEED_GRAD=need_grad, WITH_ENTROPY_GRAD=with_entropy_grad,
                                  BLOCK_V=pl.ROW_BLOCK_V)
                # The logits workspace is fp32 whatever the inputs; dz is in the inputs' dtype.
                sig, attrs = _signature_and_hints(fn.fn, constexprs,
                                                  {"z_ptr": "fp32", "dz_ptr": dtype, "tgt_ptr": "i64"},
                                                  dict(stride_z=v, stride_dz=v, inv_temp=1.0))
                yield ("_policy_rows_kernel", fn, f"BLOCK_V={pl.ROW_BLOCK_V} w{pl.ROW_WARPS} s1",
                       f"grad={'on' if need_grad else 'off'} entropy_grad={'on' if with_entropy_grad else 'off'}",
                       sig, constexprs, attrs, dtype, pl.ROW_WARPS, 1, False)


def _table(verdicts: list[Verdict]) -> str:
    head = "| kernel | dtype | config | switches | regs | spill B | wgmma | HGMMA | waits | verdict |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in verdicts:
        lines.append(f"| {v.kernel} | {v.dtype} | {v.config} | {v.switches} | {v.registers} | {v.spill_bytes} | "
                     f"{v.wgmma_ptx} | {'' if v.hgmma_sass is None else v.hgmma_sass} | "
                     f"{','.join(map(str, sorted(set(v.wait_groups))))} | "
                     f"{'ok' if not v.problems else 'FAIL: ' + '; '.join(v.problems)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90 (90: sm_90a)")
    parser.add_argument("--json", metavar="PATH", help="also write every verdict to PATH as JSON")
    parser.add_argument("--quiet", action="store_true", help="print failures and the summary line only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET; the interpreter compiles nothing", file=sys.stderr)
        return 2

    from triton.backends.compiler import GPUTarget

    # Compile every variant afresh (a cache hit runs no ptxas, so no log to read), and
    # have Triton print its ptxas -v log, which _compile captures.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    target = GPUTarget("cuda", args.arch, 32)
    start = time.time()
    print(f"compile_check: Triton {triton.__version__}, sm_{args.arch}{'a' if args.arch == 90 else ''}", flush=True)

    verdicts: list[Verdict] = []
    misjudged = _self_test(target) if args.arch >= 90 else []
    for line in misjudged:
        print(f"compile_check: detector self-test FAILED: {line}", flush=True)
    if args.arch >= 90 and not misjudged:
        print("compile_check: detector self-test ok (pipelined, serialized and spilling kernels judged right)",
              flush=True)

    for (name, fn, label, switches, sig, constexprs, attrs, dtype, warps, stages, needs_wgmma) in _cases(args.arch):
        v = judge(fn, sig, constexprs, attrs, target, warps, stages, needs_wgmma,
                  Verdict(name, dtype, label, switches))
        verdicts.append(v)
        if v.problems or not args.quiet:
            state = "ok" if not v.problems else "FAIL " + "; ".join(v.problems)
            print(f"compile_check: {name} {dtype} {label} {switches}: regs {v.registers}, spill {v.spill_bytes} B, "
                  f"wgmma {v.wgmma_ptx}, waits {sorted(set(v.wait_groups))}: {state}", flush=True)

    failed = [v for v in verdicts if v.problems]
    if not args.quiet:
        print(_table(verdicts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "seconds": round(time.time() - start, 1),
                       "self_test_misjudged": misjudged, "failed": len(failed),
                       "verdicts": [asdict(v) for v in verdicts]}, f, indent=2)
    print(f"compile_check: {len(verdicts)} kernels compiled for sm_{args.arch} in {time.time() - start:.0f} s, "
          f"{len(failed)} failed" + (f", detector self-test misjudged {len(misjudged)}" if misjudged else ""))
    return 1 if failed or misjudged else 0


if __name__ == "__main__":
    sys.exit(main())
