"""Turns the stage files of benchmarks/gpu_check.sh (a_build.json ... e_train_step.json)
into one summary table on stdout and a results pair <date>-<device>.json / .md.

    python benchmarks/gpu_report.py OUT_DIR                      # -> benchmarks/results/
    python benchmarks/gpu_report.py OUT_DIR --results-dir DIR
    python benchmarks/gpu_report.py OUT_DIR --summary-only       # the table, no files
    python benchmarks/gpu_report.py OUT_DIR --require-ok a_build,c_lm_head  # exit 1 unless those are "ok"

The JSON holds device, date, torch, Triton and CUDA, `results` (the measured records,
in the format of `pyvf bench --output`) and `stages` (each stage file as written,
status and failures included). A stage that is missing or stopped early is reported
with its status, never dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

# In the order gpu_check.sh runs them: the lm_head benchmarks before the GPU tests.
STAGES = (("a_build", "a. build"), ("c_lm_head", "c. lm_head"), ("b_tests", "b. GPU tests"),
          ("d_advantages", "d. grouped_advantages"), ("e_train_step", "e. training step"))


def load_stages(out_dir: str) -> dict[str, dict]:
    stages = {}
    for name, _ in STAGES:
        path = os.path.join(out_dir, name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                stages[name] = json.load(f)
    return stages


def environment(stages: dict[str, dict]) -> dict:
    """device, date, torch, triton, cuda from the first stage that recorded them."""
    for name in ("c_lm_head", "d_advantages", "e_train_step"):
        env = stages.get(name, {}).get("env")
        if env:
            return env
    build = stages.get("a_build", {})
    info = build.get("build_info", {})
    return {"device": build.get("device", "unknown"), "date": None, "torch": info.get("torch"),
            "triton": info.get("triton"), "cuda": None}


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if b is not None else ""


def _ms(r) -> str:
    return f"{r['ms']:.3f}" if r.get("ms") is not None else ""


def summarize(name: str, s: dict) -> str:
    """One line: the stage's headline result."""
    if name == "a_build":
        info = s.get("build_info")
        if not info:
            return s.get("import_error", "no build info")
        return (f"native={info.get('native')} cuda={info.get('cuda')} archs={info.get('cuda_archs') or '-'} "
                f"torch {info.get('torch')} triton {info.get('triton')}"
                + (f"; {s['problem']}" if s.get("problem") else ""))
    if name == "b_tests":
        counts = s.get("counts", {})
        text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no test result"
        bf16 = s.get("bf16", {})
        text += f" (bf16: {bf16.get('PASSED', 0)} passed, {bf16.get('FAILED', 0)} failed)"
        fails = s.get("failures", [])
        if fails:
            text += "; failed: " + ", ".join(f["test"].split("::", 1)[-1] for f in fails[:6])
            text += f" and {len(fails) - 6} more" if len(fails) > 6 else ""
        return text
    records = s.get("records", [])
    if name == "c_lm_head":
        parts = []
        for r in records:
            if r.get("ms") is None:
                parts.append(f"{r['impl']} {r.get('status')}")
            else:
                text = f"{r['impl']} {r['ms']:.3g} ms, {r['tflops']:.3g} TFLOP/s"
                if r.get("peak_mem_bytes") is not None:
                    text += f", {_gib(r['peak_mem_bytes'])} GiB"
                parts.append(text)
        return "; ".join(parts) or "no record"
    if name == "d_advantages":
        if not records:
            return "no record"
        largest = max(r["n"] for r in records)
        at = {r["impl"]: r for r in records if r["n"] == largest and r["op"] == "grouped_advantages"}
        return f"B={largest}: " + ", ".join(
            f"{impl} {r['ms'] * 1e3:.1f} us ({r.get('gb_per_s')} GB/s)" for impl, r in at.items() if r.get("ms"))
    if name == "e_train_step":
        parts = []
        by_shape = {}
        for r in records:
            by_shape.setdefault(r.get("shape"), {})[r["impl"]] = r
        for shape, impls in by_shape.items():
            p, f = impls.get("pyvf", {}), impls.get("full-logits", {})

            def rate(r):
                return f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else str(r.get("status"))

            text = f"{shape}: pyvf {rate(p)} vs full-logits {rate(f)} tokens/s"
            if p.get("tokens_per_s") and f.get("tokens_per_s"):
                text += f" ({p['tokens_per_s'] / f['tokens_per_s']:.2f}x)"
            parts.append(text)
        for found in s.get("longest", []):
            extra = f", memory extrapolated {found['memory_extrapolated']}" if found.get("memory_extrapolated") else ""
            parts.append(f"longest {found['shape']} {found['impl']} {found['longest']} ({found['stopped_by']}{extra})")
        return "; ".join(parts) or "no record"
    return ""


def summary_table(stages: dict[str, dict]) -> str:
    lines = ["| stage | status | seconds | result |", "|---|---|---|---|"]
    for name, label in STAGES:
        s = stages.get(name)
        if s is None:
            lines.append(f"| {label} | missing | | stage file not written |")
            continue
        result = summarize(name, s).replace("|", "/")
        lines.append(f"| {label} | {s.get('status')} | {s.get('seconds', '')} | {result} |")
    return "\n".join(lines)


def _lm_head_md(s: dict) -> list[str]:
    shape = s.get("shape", {})
    lines = [f"## lm_head forward+backward, N={shape.get('n')}, H={shape.get('h')}, V={shape.get('v')}, "
             f"{shape.get('dtype')} (TFLOP/s counted 6NHV)", "",
             "| impl | ms | TFLOP/s | peak GiB | vs pyvf | status |", "|---|---|---|---|---|---|"]
    records = s.get("records", [])
    base = next((r["ms"] for r in records if r["impl"] == "pyvf" and r.get("ms")), None)
    for r in records:
        ratio = f"{r['ms'] / base:.2f}x" if base and r.get("ms") else ""
        tflops = f"{r['tflops']:.3g}" if r.get("tflops") else ""
        lines.append(f"| {r['impl']} | {_ms(r)} | {tflops} | {_gib(r.get('peak_mem_bytes'))} | {ratio} | "
                     f"{r.get('status')} |")
    lines += [f"- {note}" for note in s.get("notes", [])]
    return lines + [""]


def _advantages_md(s: dict) -> list[str]:
    lines = ["## grouped_advantages and segment_sum (fp32, groups of 8)", "",
             "| op | impl | B | us | GB/s | peak MiB |", "|---|---|---|---|---|---|"]
    for r in s.get("records", []):
        us = f"{r['ms'] * 1e3:.1f}" if r.get("ms") is not None else r.get("status")
        peak = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else ""
        lines.append(f"| {r['op']} | {r['impl']} | {r['n']} | {us} | {r.get('gb_per_s') or ''} | {peak} |")
    if s.get("timing"):
        lines.append(f"- timing: {s['timing']}")
    return lines + [""]


def _train_md(s: dict) -> list[str]:
    lines = [f"## One VeriFree training step ({s.get('dtype')}, random init)", "",
             "| shape | impl | tokens | ms | tokens/s | peak GiB | status |", "|---|---|---|---|---|---|---|"]
    for r in s.get("records", []):
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""
        lines.append(f"| {r.get('shape')} | {r['impl']} | {r['n']} | {_ms(r)} | {tps} | "
                     f"{_gib(r.get('peak_mem_bytes'))} | {r.get('status')} |")
    if s.get("longest"):
        lines += ["", "| shape | impl | longest sequence run (tokens) | stopped by | memory extrapolated | "
                  "steps (tokens: s, peak GiB) |", "|---|---|---|---|---|---|"]
        for f in s["longest"]:
            steps = ", ".join(f"{n}: {t} s" + (f", {_gib(m)}" if m is not None else "")
                              for n, t, m in f.get("steps", []))
            lines.append(f"| {f['shape']} | {f['impl']} | {f['longest']} | {f['stopped_by']} | "
                         f"{f.get('memory_extrapolated') or ''} | {steps} |")
    lines += [f"- {note}" for note in s.get("notes", [])]
    return lines + [""]


def _tests_md(s: dict) -> list[str]:
    lines = ["## GPU tests", "", summarize("b_tests", s), ""]
    for f in s.get("failures", []):
        lines.append(f"- {f['outcome']} `{f['test']}`: {f.get('message', '')}")
    return lines + [""]


def write_results(stages: dict[str, dict], results_dir: str) -> list[str]:
    env = environment(stages)
    device = re.sub(r"[^A-Za-z0-9._-]+", "-", str(env.get("device") or "unknown")).strip("-")
    date = env.get("date") or "undated"
    stem = os.path.join(results_dir, f"{date}-{device}")
    records = []
    for name in ("c_lm_head", "d_advantages", "e_train_step"):
        for r in stages.get(name, {}).get("records", []):
            records.append(dict(r))
    os.makedirs(results_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({**env, "command": "bash benchmarks/gpu_check.sh OUT", "results": records, "stages": stages},
                  f, indent=2, default=str)
    md = [f"# pyvf GPU check: {env.get('device')}, {date}", "",
          f"torch {env.get('torch')}, Triton {env.get('triton')}, CUDA {env.get('cuda')}. "
          "Command: `bash benchmarks/gpu_check.sh OUT`, then `python benchmarks/gpu_report.py OUT`.", "",
          summary_table(stages), ""]
    if "c_lm_head" in stages:
        md += _lm_head_md(stages["c_lm_head"])
    if "b_tests" in stages:
        md += _tests_md(stages["b_tests"])
    if "d_advantages" in stages:
        md += _advantages_md(stages["d_advantages"])
    if "e_train_step" in stages:
        md += _train_md(stages["e_train_step"])
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    return [stem + ".json", stem + ".md"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the OUT folder gpu_check.sh wrote")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--require-ok", default="", metavar="STAGES",
                        help="comma-separated stage names (a_build, ...); exit 1 unless each has status ok")
    args = parser.parse_args(argv)
    stages = load_stages(args.out_dir)
    if not stages:
        print(f"gpu_report: no stage file (a_build.json ... e_train_step.json) in {args.out_dir}", file=sys.stderr)
        return 1
    print(summary_table(stages))
    if not args.summary_only:
        print("gpu_report: wrote " + ", ".join(write_results(stages, args.results_dir)))
    known = {name for name, _ in STAGES}
    required = [name for name in args.require_ok.split(",") if name]
    unknown = [name for name in required if name not in known]
    if unknown:
        print(f"gpu_report: --require-ok names no stage: {', '.join(unknown)} (stages: {', '.join(sorted(known))})",
              file=sys.stderr)
        return 2
    not_ok = [f"{name} {stages[name].get('status')}" if name in stages else f"{name} missing"
              for name in required if stages.get(name, {}).get("status") != "ok"]
    if not_ok:
        print(f"gpu_report: stages not ok: {', '.join(not_ok)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
