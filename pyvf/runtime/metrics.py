"""Per-step metrics: metrics.jsonl (one JSON object per step), TensorBoard events when
tensorboard is installed, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pyvf.runtime.checkpoint import write_atomic

log = logging.getLogger("pyvf")

PLOTTED = ("loss", "reward_mean", "marker_frac", "advantage_std", "reasoning_len", "grad_norm", "rollout_logprob_diff",
           "eval_accuracy")
# The step profile, drawn together in one panel (seconds per phase).
PROFILE = ("time_rollout", "time_scoring", "time_reward_pass", "time_forward_backward", "time_optimizer",
           "time_weight_sync")


class MetricsLog:
    def __init__(self, output_dir: Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run keeps the steps up to its checkpoint and writes the rest again, so
        # each step is there once however the last run ended (a line torn by a kill is dropped).
        kept = [json.dumps(r) for r in _read(self.path) if r["step"] <= resume_step] if resume_step else []
        write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops the events a crashed run wrote after the checkpoint.
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                            purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                log.info("metrics: tensorboard not installed, no event files")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def records(self) -> list[dict]:
        return _read(self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _read(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line a kill cut short is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("metrics: dropping a torn line of %s", path)
    return records


def plot(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Draws the curves of PLOTTED to a PNG; None when matplotlib is missing or nothing ran."""
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("metrics: matplotlib not installed, no plot")
        return None
    keys = [k for k in PLOTTED if any(k in r for r in records)]
    phases = [k for k in PROFILE if any(r.get(k) for r in records)]
    panels = len(keys) + bool(phases)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.0 * panels), sharex=True)
    axes = [axes] if panels == 1 else list(axes)
    steps = [r["step"] for r in records]
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        # A metric of some steps only (held-out accuracy) is drawn at those steps, with markers.
        ax.plot(*zip(*points), lw=1.2, marker="o" if len(points) < len(records) else None, markersize=3)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    if phases:
        ax = axes[-1]
        for key in phases:
            ax.plot(steps, [r.get(key, 0.0) for r in records], lw=1.2, label=key.removeprefix("time_"))
        ax.set_ylabel("seconds per step", fontsize=8)
        ax.legend(fontsize=7, ncol=3)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
