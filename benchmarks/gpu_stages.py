"""The stages of benchmarks/gpu_check.sh, one subcommand each. Every stage writes one
JSON file and rewrites it after each measurement, so a stage stopped by its time limit
still leaves what it finished (the shell script then marks the file "timeout").

    python benchmarks/gpu_stages.py build   OUT/a_build.json --rc RC --seconds S --log BUILD_LOG
    python benchmarks/gpu_stages.py tests   OUT/b_tests.json --rc RC --seconds S --log PYTEST_LOG [--junit XML]
    python benchmarks/gpu_stages.py lm_head OUT/c_lm_head.json [--small]
    python benchmarks/gpu_stages.py advantages OUT/d_advantages.json [--small]
    python benchmarks/gpu_stages.py train_step OUT/e_train_step.json [--small] [--budget SECONDS]
    python benchmarks/gpu_stages.py mark    OUT/x.json --status timeout --rc RC --seconds S

--small runs the same code at tiny shapes (any device; the CPU when there is no GPU),
which is how the plumbing is tested without a GPU. Each file holds: stage, status
("running", "ok", "failed", "timeout", "skipped"), seconds, env (device, date, torch,
Triton, CUDA), and the stage's own fields (records, failures, notes).

Temporary files go to $PYVF_GPU_TMPDIR (gpu_check.sh points it outside OUT), never
beside the stage files: a device call brings back at most 8 files, and a stage killed
between writing a temporary and renaming it would leave a ninth.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

# The repository root on sys.path (this file runs as a script from anywhere).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Headline shape of the lm_head stage (Qwen3-8B's hidden size and vocabulary, 16k tokens).
HEADLINE = (16384, 4096, 151936)
SMALL_LM_HEAD = (64, 32, 1000)
# Order matters under a time limit: pyvf and the baselines first, torch.compile (the
# longest to compile) last.
LM_HEAD_IMPLS = ("pyvf", "pyvf-token_logprobs", "full-logits", "liger-flce", "cut-cross-entropy",
                 "cut-cross-entropy-nofilter", "quack-lce", "torch-compile-chunked")
# Why QuACK is usually absent on the lent GPU: its CuTe DSL runtime does not fit the call.
QUACK_NOTE = ("QuACK needs nvidia-cutlass-dsl-libs-cu12 or -cu13 (each an 88 MiB wheel), more than the "
              "64 MiB a device call carries; it runs only where that package is installed")

ADVANTAGE_SIZES = (10**4, 10**5, 10**6, 4 * 10**6, 16 * 10**6)
SMALL_ADVANTAGE_SIZES = (10**4, 10**5)
# Bytes written before each timed call so that no input is still in L2 (the H200's is
# 60 MB; 16e6 fp32 rewards are 64 MB), and long enough (~0.1 ms on the GPU) that the
# host's launch of the next call overlaps it instead of being timed.
L2_FLUSH_BYTES = 256 * 2**20

# (shape, sequences, tokens per sequence) of the step benchmark; (shape, start, limit)
# of the longest-completion search (one sequence, lengths doubling).
TRAIN_CASES = (("qwen3-0.6b", 8, 2048), ("qwen3-1.7b", 8, 2048))
LONGEST_SEARCH = {"qwen3-0.6b": (4096, 262144), "qwen3-1.7b": (4096, 262144)}
SMALL_TRAIN_CASES = (("tiny", 4, 64),)
SMALL_LONGEST_SEARCH = {"tiny": (64, 256)}
TRAIN_IMPLS = ("pyvf", "full-logits")


def _kept_copy(path: str) -> str:
    """Where write_json keeps the last complete version of `path`: $PYVF_GPU_TMPDIR (a
    fresh folder per gpu_check.sh run), else a folder of the system's temporary folder
    named after path's folder, so that two OUT folders never share kept copies."""
    folder = os.environ.get("PYVF_GPU_TMPDIR")
    if not folder:
        tag = hashlib.sha1(os.path.dirname(os.path.abspath(path)).encode()).hexdigest()[:12]
        folder = os.path.join(tempfile.gettempdir(), f"pyvf-gpu-stages-{tag}")
    return os.path.join(folder, os.path.basename(path))


def write_json(path: str, data: dict) -> None:
    """Writes `path` whole without ever leaving a temporary file in its folder.

    The JSON goes to a temporary file in the temporary folder, renamed there over the
    kept copy (atomic: that copy is always a complete file), then copied over `path`:
    OUT may be on another filesystem, where no rename reaches it. A kill during that
    copy leaves `path` cut short; `mark` then restores it from the kept copy."""
    kept = _kept_copy(path)
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(kept), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, kept)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.path.abspath(kept) != os.path.abspath(path):
        shutil.copyfile(kept, path)


def read_json(path: str) -> dict | None:
    """The stage file at `path`; its kept copy when a kill cut `path` short (the copy
    is never older: write_json renames it into place before copying); None when there
    is no complete file (a missing `path` means the stage never wrote one)."""
    if not os.path.exists(path):
        return None
    for candidate in (path, _kept_copy(path)):
        try:
            with open(candidate) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


class StageFile:
    """One stage's JSON, rewritten whole each time something is added (write_json: no
    temporary file beside it; a copy a kill cuts short is restored by `mark`)."""

    def __init__(self, path: str, stage: str, device=None):
        self.path = path
        self.start = time.time()
        self.data = {"stage": stage, "status": "running", "seconds": 0.0}
        if device is not None:
            from pyvf.bench import environment

            self.data["env"] = environment(device)
        self.save()

    @classmethod
    def load(cls, path: str) -> "StageFile | None":
        data = read_json(path)
        if data is None:
            return None
        self = cls.__new__(cls)
        self.path, self.start, self.data = path, time.time(), data
        return self

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self.start, 1)
        write_json(self.path, self.data)

    def add(self, key: str, item) -> None:
        self.data.setdefault(key, []).append(item)
        self.save()

    def finish(self, status: str = "ok", **fields) -> None:
        self.data.update(fields)
        self.data["status"] = status
        self.save()


def _device(small: bool):
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not small:
        raise SystemExit("gpu_stages: no CUDA device; run with --small to exercise the stage on the CPU")
    return torch.device("cpu")


def _tail(path: str | None, lines: int = 40) -> list[str]:
    if not path or not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return [line.rstrip("\n") for line in f.readlines()[-lines:]]


# --- a: build ---------------------------------------------------------------------------

def stage_build(args) -> int:
    """Records pyvf.build_info() after the build the shell script ran (rc, seconds, log)."""
    out = StageFile(args.json, "a_build")
    out.start -= args.seconds
    fields = {"build_rc": args.rc}
    try:
        import torch

        import pyvf

        fields["build_info"] = pyvf.build_info()
        fields["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            fields["device"] = torch.cuda.get_device_name()
    except Exception as e:  # noqa: BLE001 - an unimportable build is this stage's result
        fields["import_error"] = f"{type(e).__name__}: {e}"
    ok = args.rc == 0 and "build_info" in fields and fields["build_info"].get("native")
    if ok and fields.get("torch_cuda") and not fields["build_info"].get("cuda"):
        ok = False
        fields["problem"] = "torch sees a GPU but pyvf._C was built without CUDA"
    if not ok:
        fields["log_tail"] = _tail(args.log)
    out.finish("ok" if ok else "failed", **fields)
    print(f"gpu_stages: build {'ok' if ok else 'FAILED'}: {fields.get('build_info', fields.get('import_error'))}")
    return 0 if ok else 1


# --- b: tests ----------------------------------------------------------------------------

_RESULT_WORDS = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"


def parse_pytest_log(path: str) -> dict[str, dict]:
    """test id -> {outcome, message} from a `pytest -v` log (plain or pytest-xdist
    lines, messages from the short summary); a log cut short by a timeout gives the
    tests that finished."""
    results = {}
    if not path or not os.path.exists(path):
        return results
    plain = re.compile(rf"^(\S+::\S+)\s+({_RESULT_WORDS})\b")
    xdist = re.compile(rf"^\[gw\d+\]\s+\[\s*\d+%\]\s+({_RESULT_WORDS})\s+(\S+::\S+)")
    summary = re.compile(r"^(FAILED|ERROR) (\S+::\S+) - (.*)$")
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            m = summary.match(line)
            if m:
                results.setdefault(m.group(2), {"outcome": m.group(1)})["message"] = m.group(3)[:300]
                continue
            m = plain.match(line)
            if m:
                results.setdefault(m.group(1), {"message": ""})["outcome"] = m.group(2)
                continue
            m = xdist.match(line)
            if m:
                results.setdefault(m.group(2), {"message": ""})["outcome"] = m.group(1)
    return results


def parse_junit(path: str) -> dict[str, dict]:
    """test id -> {outcome, message} from a JUnit XML report."""
    results = {}
    if not path or not os.path.exists(path):
        return results
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:  # cut short: the -v log has the outcomes
        return results
    for case in root.iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        test_id = f"{file}::{case.get('name')}"
        outcome, message = "PASSED", ""
        for tag, word in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "SKIPPED")):
            child = case.find(tag)
            if child is not None:
                outcome, message = word, (child.get("message") or "").strip().splitlines()[0:1]
                message = message[0][:300] if message else ""
                break
        results[test_id] = {"outcome": outcome, "message": message}
    return results


def stage_tests(args) -> int:
    out = StageFile(args.json, "b_tests")
    out.start -= args.seconds
    junit = parse_junit(args.junit)
    results = junit or parse_pytest_log(args.log)
    outcomes = {k: v["outcome"] for k, v in results.items()}
    counts = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    failures = [{"test": t, "outcome": o, "message": results[t].get("message", "")}
                for t, o in sorted(outcomes.items()) if o in ("FAILED", "ERROR")]
    bf16 = {o: sum(1 for t, x in outcomes.items() if "bf16" in t and x == o) for o in ("PASSED", "FAILED")}
    # pytest: 0 all passed, 1 some failed, 5 none collected; anything else (or no result
    # at all) means the run itself broke.
    status = "ok" if args.rc == 0 and outcomes else "failed"
    fields = dict(pytest_rc=args.rc, counts=counts, bf16=bf16, failures=failures,
                  source="junit" if junit else "log")
    if status == "failed" and not failures:
        fields["log_tail"] = _tail(args.log)
    out.finish(status, **fields)
    print(f"gpu_stages: tests {status}: {counts}; {len(failures)} failed")
    for f in failures:
        print(f"gpu_stages:   {f['outcome']} {f['test']} {f['message'][:160]}")
    return 0


# --- c: lm_head -------------------------------------------------------------------------

def stage_lm_head(args) -> int:
    """pyvf.bench.policy_loss's implementations on its inputs (logits of std ~3, as in
    the tests), with what those logits are."""
    import torch

    from pyvf.bench import dtype_name
    from pyvf.bench.policy_loss import bench_policy_loss
    from pyvf.bench.token_logprobs import LOGIT_STD, lm_head_inputs

    device = _device(args.small)
    n, h, v = SMALL_LM_HEAD if args.small else HEADLINE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = StageFile(args.json, "c_lm_head", device)
    hidden, weight, _ = lm_head_inputs(n, h, v, dtype, device)
    with torch.no_grad():
        rows = hidden[:256].float() @ weight.float().t()
        logit_std = float(rows.std())
        # What Cut Cross-Entropy's default filter would skip on these logits: 128 x 128
        # blocks of the gradient whose softmax probabilities are all below 2^-12 (its
        # threshold for bf16, finfo.eps / 32), the targets aside.
        probs = torch.softmax(rows, dim=-1)
        rb, vb = min(128, probs.shape[0]), 128
        probs = probs[: probs.shape[0] // rb * rb, : probs.shape[1] // vb * vb]
        blocks = (probs >= 2.0**-12).view(probs.shape[0] // rb, rb, probs.shape[1] // vb, vb)
        filter_skips = 1.0 - float(blocks.any(dim=3).any(dim=1).float().mean())
    del hidden, weight, rows, probs, blocks  # bench_policy_loss draws the same inputs again
    out.data.update(shape=dict(n=n, h=h, v=v, dtype=dtype_name(dtype)), flops_counted="6NHV",
                    logit_std=round(logit_std, 3), cce_filter_skips=round(filter_skips, 4),
                    notes=[f"logits of std {logit_std:.2f} (hidden ~ N(0, 1), lm_head ~ N(0, {LOGIT_STD:g}^2 / H)), "
                           "as in the tests; random targets",
                           f"Cut Cross-Entropy's default filter would skip {100 * filter_skips:.0f}% of the "
                           "128 x 128 gradient blocks (all probabilities below 2^-12; first 256 rows)"])
    out.save()
    print(f"gpu_stages: lm_head N={n} H={h} V={v} {dtype_name(dtype)}, logit std {logit_std:.2f}", flush=True)

    def on_record(rec):
        print(f"gpu_stages: lm_head {rec.impl}: "
              + (f"{rec.ms:.2f} ms, {rec.tflops:.0f} TFLOP/s, peak {rec.peak_mem_bytes / 2**30:.2f} GiB"
                 if rec.ms is not None and rec.peak_mem_bytes is not None
                 else f"{rec.ms:.2f} ms" if rec.ms is not None else rec.status), flush=True)
        if rec.impl == "quack-lce" and rec.status.startswith("skipped"):
            out.data["notes"].append(QUACK_NOTE)
        out.add("records", rec.to_json())

    # One warm-up call: the first compiles (Triton autotunes every config then).
    bench_policy_loss(n, h, v, dtype, device, impls=list(args.impls or LM_HEAD_IMPLS), repeats=5, warmup=1,
                      on_record=on_record)
    out.finish("ok")
    return 0


# --- d: grouped_advantages ----------------------------------------------------------------

def device_time_ms(fn, device, repeats: int = 100, warmup: int = 5) -> float:
    """Median time of one fn() call in milliseconds. On a GPU, CUDA events recorded
    around each call, after a write of L2_FLUSH_BYTES (cold L2; the host's launch
    overhead hidden behind the flush): the kernels take microseconds, which a host
    clock with a synchronize per call cannot resolve. On the CPU (the dry run) the host
    clock, as pyvf.bench.time_ms."""
    import torch

    from pyvf.bench import time_ms

    if device.type != "cuda":
        return time_ms(fn, device, repeats=min(repeats, 20), warmup=2)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def stage_advantages(args) -> int:
    from pyvf.bench import Record, peak_memory_bytes
    from pyvf.bench.advantages import advantage_cases

    device = _device(args.small)
    out = StageFile(args.json, "d_advantages", device)
    out.data["timing"] = ("median of 100 calls, CUDA events around each, L2 flushed before each"
                          if device.type == "cuda" else "median of 20 calls, host clock (no GPU)")
    out.save()
    for n in SMALL_ADVANTAGE_SIZES if args.small else ADVANTAGE_SIZES:
        for op, impl, fn in advantage_cases(n, device):
            rec = Record(op, impl, "fwd", n, 0, 0, "float32", None, None, None)
            try:
                rec.ms = device_time_ms(fn, device)
                rec.peak_mem_bytes = peak_memory_bytes(fn, device)
            except Exception as e:  # noqa: BLE001 - one failing case is a result; the others still run
                rec.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            d = rec.to_json()
            # Bytes a pass must move: read the rewards (fp32) and write one value each,
            # for grouped_advantages and the copy; segment_sum reads B values only.
            moved = (8 if op == "grouped_advantages" else 4) * n
            d["gb_per_s"] = round(moved / (rec.ms * 1e-3) / 1e9, 2) if rec.ms else None
            out.add("records", d)
        line = ", ".join(f"{r['op']}/{r['impl']} " + (f"{r['ms'] * 1e3:.1f} us" if r["ms"] else r["status"])
                         for r in out.data["records"][-5:])
        print(f"gpu_stages: B={n}: {line}", flush=True)
    out.finish("ok")
    return 0


# --- e: training step -----------------------------------------------------------------------

def stage_train_step(args) -> int:
    import torch

    from pyvf.bench.train_step import _qwen3, bench_train_step, search_longest

    device = _device(args.small)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = 151936 if device.type == "cuda" else 32000
    cases = SMALL_TRAIN_CASES if args.small else TRAIN_CASES
    searches = SMALL_LONGEST_SEARCH if args.small else LONGEST_SEARCH
    out = StageFile(args.json, "e_train_step", device)
    out.data.update(dtype=str(dtype).replace("torch.", ""), vocab=vocab, notes=[
        "random init; one VeriFree step: forward, answer-row look, loss, backward, clip, AdamW",
        "longest: one sequence of that many tokens (20% prompt, 80% completion), lengths doubling",
    ])
    out.save()
    start = time.time()
    bench_seconds = None  # the first shape's step benchmark, to reserve time for the next
    for i, (shape, n_seq, seq_len) in enumerate(cases):
        model = _qwen3(shape, vocab, dtype, device)

        def on_record(rec, shape=shape):
            d = rec.to_json()
            d["shape"] = shape
            out.add("records", d)
            print(f"gpu_stages: train_step {shape} {rec.impl}: "
                  + (f"{rec.ms:.0f} ms, {rec.tokens_per_s:.0f} tokens/s" if rec.ms else rec.status), flush=True)

        t0 = time.time()
        bench_train_step(shape, n_seq, seq_len, device, dtype, vocab=vocab, impls=TRAIN_IMPLS, model=model,
                         on_record=on_record)
        bench_seconds = bench_seconds or time.time() - t0
        first, limit = searches[shape]
        for j, impl in enumerate(TRAIN_IMPLS):
            budget = None
            if args.budget:
                # What is left, less 3x the first step benchmark for each shape still to
                # come (larger models), shared by the searches still to run.
                searches_left = (len(cases) - i) * len(TRAIN_IMPLS) - j
                reserve = 3 * bench_seconds * (len(cases) - i - 1)
                budget = max(0.0, (args.budget - (time.time() - start) - reserve) / searches_left)
            found = search_longest(model, impl, device, n_seq=1, start=first, limit=limit, time_budget_s=budget)
            found.update(shape=shape, impl=impl, budget_s=None if budget is None else round(budget, 1))
            out.add("longest", found)
            print(f"gpu_stages: longest {shape} {impl}: {found['longest']} tokens "
                  f"(stopped by {found['stopped_by']})", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.finish("ok")
    return 0


# --- the shell script's bookkeeping -------------------------------------------------------------

def stage_mark(args) -> int:
    """Marks a stage's file after the shell script stopped it, skipped it or saw it die:
    keeps what it holds (restored from the kept copy when the kill cut the file short),
    sets status; writes a stub when the stage never wrote its file."""
    out = StageFile.load(args.json)
    if out is None:
        out = StageFile(args.json, args.stage or os.path.basename(args.json).rsplit(".", 1)[0])
    out.data["exit_code"] = args.rc
    out.data["seconds"] = args.seconds
    out.data["status"] = args.status
    if args.reason:
        out.data.setdefault("notes", []).append(args.reason)
    if args.log:
        out.data["log_tail"] = _tail(args.log, 25)
    write_json(args.json, out.data)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in ("build", "tests"):
        p = sub.add_parser(name)
        p.add_argument("json")
        p.add_argument("--rc", type=int, required=True)
        p.add_argument("--seconds", type=float, default=0.0)
        p.add_argument("--log")
        if name == "tests":
            p.add_argument("--junit")
    for name in ("lm_head", "advantages", "train_step"):
        p = sub.add_parser(name)
        p.add_argument("json")
        p.add_argument("--small", action="store_true", help="tiny shapes (the CPU when there is no GPU)")
        if name == "lm_head":
            p.add_argument("--impls", nargs="+", choices=LM_HEAD_IMPLS, help="a subset, in this order")
        if name == "train_step":
            p.add_argument("--budget", type=float,
                           help="seconds the whole stage may take; the longest-completion searches stop in time")
    p = sub.add_parser("mark")
    p.add_argument("json")
    p.add_argument("--status", required=True, choices=("timeout", "failed", "skipped"))
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--log")
    p.add_argument("--reason", help="a note saying why (a skipped stage)")
    p.add_argument("--name", dest="stage_name")
    args = parser.parse_args(argv)
    handlers = {"build": stage_build, "tests": stage_tests, "lm_head": stage_lm_head,
                "advantages": stage_advantages, "train_step": stage_train_step, "mark": stage_mark}
    if args.stage == "mark":
        args.stage = args.stage_name
        return stage_mark(args)
    return handlers[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
