"""`Weighted([(v, w), ...])`: a weighted sum of verifiers' scores.

score_i = sum_k w_k s_ik. A part that returns NaN for a completion (no opinion) is left
out of that completion's sum, as TRL sums its reward functions; a completion every
part left out stays NaN. The name is the parts' names joined as get_verifier reads them
back ("rule+0.5*majority"); `stats` gathers the parts' counts as "<part name>/<key>".
"""

from __future__ import annotations

import math

from pyvf.verify.base import Verifier, check_batch


class Weighted:
    def __init__(self, parts):
        if isinstance(parts, (str, bytes)) or not hasattr(parts, "__iter__"):
            raise ValueError(f"parts must be a list of (verifier, weight) pairs, got {type(parts).__name__}")
        parts = list(parts)
        if not parts:
            raise ValueError("parts must hold at least one (verifier, weight) pair")
        checked = []
        for i, part in enumerate(parts):
            if not isinstance(part, (tuple, list)) or len(part) != 2:
                raise ValueError(f"parts[{i}] must be a (verifier, weight) pair, got {part!r}")
            v, w = part
            if not callable(v) or not isinstance(getattr(v, "name", None), str):
                raise ValueError(f"parts[{i}]: {v!r} is not a verifier (a callable with a `name`)")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"parts[{i}]: weight must be a finite number, got {w!r}")
            checked.append((v, float(w)))
        self.parts: list[tuple[Verifier, float]] = checked
        self.name = "+".join(v.name if w == 1 else f"{w:g}*{v.name}" for v, w in checked)

    @property
    def stats(self) -> dict[str, float]:
        out = {}
        for v, _ in self.parts:
            for key, value in getattr(v, "stats", {}).items():
                out[f"{v.name}/{key}"] = out.get(f"{v.name}/{key}", 0) + value
        return out

    def reset_stats(self) -> None:
        for v, _ in self.parts:
            if hasattr(v, "reset_stats"):
                v.reset_stats()

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, references = check_batch(prompts, completions, references, who=self.name)
        total = [0.0] * len(completions)
        seen = [False] * len(completions)
        for v, w in self.parts:
            scores = list(v(prompts, completions, references))
            if len(scores) != len(completions):
                raise ValueError(f"verifier {v.name} returned {len(scores)} scores for {len(completions)} "
                                 f"completions")
            for i, s in enumerate(scores):
                s = float(s)
                if math.isnan(s):
                    continue
                total[i] += w * s
                seen[i] = True
        return [t if ok else float("nan") for t, ok in zip(total, seen)]

    def __repr__(self) -> str:
        return f"<verifier {self.name}>"


__all__ = ["Weighted"]
