"""Rubrics: named criteria with weights and a rating scale, loaded from YAML (built-in
ones in pyvf/data/rubrics/), and the rating block that rates a text against one.

A rubric is a YAML file:

    name: story
    scale: [1, 5]
    criteria:
      - name: structure
        description: a beginning, a middle and an end, in that order
        weight: 1          # optional, default 1

The rating is one block in a fixed format, every criterion once, in any order:

    <rating>structure: 4; descriptive: 5; person: 5; tone: 3; words: 4</rating>

Entries are `name: integer` separated by `;` (spaces optional, names case-insensitive,
a trailing `;` allowed). `parse_rating` turns the block into a score in [0, 1]: the
weighted mean over criteria of (rating - min) / (max - min). It returns None, with the
reason, for a text with no complete block or several blocks, an entry that is not
`name: integer`, an unknown or repeated criterion, a rating outside the scale, or a
missing criterion. The verifier scores such a completion 0 and counts it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

OPEN, CLOSE = "<rating>", "</rating>"
BUILTIN_RUBRICS = Path(__file__).resolve().parent / "rubrics"

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_ENTRY = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)\s*:\s*([+-]?\d+)$")


@dataclass(frozen=True)
class Criterion:
    name: str          # lower case letters, digits, _ and -; what the rating block names
    description: str
    weight: float = 1.0


@dataclass(frozen=True)
class Rubric:
    name: str
    scale: tuple[int, int]         # (min, max) integer ratings, min < max
    criteria: tuple[Criterion, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"rubric name must be a non-empty string, got {self.name!r}")
        lo_hi = self.scale
        if (not isinstance(lo_hi, (tuple, list)) or len(lo_hi) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in lo_hi) or lo_hi[0] >= lo_hi[1]):
            raise ValueError(f"rubric {self.name!r}: scale must be two integers [min, max] with min < max, "
                             f"got {lo_hi!r}")
        object.__setattr__(self, "scale", (int(lo_hi[0]), int(lo_hi[1])))
        if not self.criteria:
            raise ValueError(f"rubric {self.name!r}: criteria must list at least one criterion")
        seen = set()
        for c in self.criteria:
            if not isinstance(c, Criterion):
                raise ValueError(f"rubric {self.name!r}: criteria must be Criterion objects, got {c!r}")
            if not isinstance(c.name, str) or not _NAME.match(c.name):
                raise ValueError(f"rubric {self.name!r}: criterion name {c.name!r} must be lower case letters, "
                                 f"digits, _ or -, starting with a letter")
            if c.name in seen:
                raise ValueError(f"rubric {self.name!r}: criterion {c.name!r} is listed twice")
            seen.add(c.name)
            if not isinstance(c.description, str) or not c.description.strip():
                raise ValueError(f"rubric {self.name!r}: criterion {c.name!r} needs a non-empty description")
            if (isinstance(c.weight, bool) or not isinstance(c.weight, (int, float)) or not math.isfinite(c.weight)
                    or c.weight <= 0):
                raise ValueError(f"rubric {self.name!r}: criterion {c.name!r} weight must be a finite number > 0, "
                                 f"got {c.weight!r}")
        object.__setattr__(self, "criteria", tuple(self.criteria))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.criteria)

    def score(self, ratings: dict[str, int]) -> float:
        """The weighted mean of (rating - min) / (max - min) over the criteria, in [0, 1].
        `ratings` must rate every criterion within the scale (as `read_ratings` returns)."""
        lo, hi = self.scale
        total = sum(c.weight for c in self.criteria)
        return sum(c.weight * (ratings[c.name] - lo) / (hi - lo) for c in self.criteria) / total

    def render(self, ratings: dict[str, int]) -> str:
        """The rating block for `ratings`, in the rubric's order (what a warm-up teaches)."""
        missing = [n for n in self.names if n not in ratings]
        if missing:
            raise ValueError(f"ratings: no rating for {', '.join(missing)} (rubric {self.name!r})")
        lo, hi = self.scale
        for n in self.names:
            r = ratings[n]
            if isinstance(r, bool) or not isinstance(r, int) or not lo <= r <= hi:
                raise ValueError(f"ratings[{n!r}] must be an integer in [{lo}, {hi}], got {r!r}")
        return OPEN + "; ".join(f"{n}: {ratings[n]}" for n in self.names) + CLOSE

    def instructions(self) -> str:
        """The criteria and the output format in words, to put in a prompt for a model
        that was not trained on the format (a real LLM as policy or rater)."""
        lo, hi = self.scale
        lines = [f"Rate the answer on each criterion from {lo} (worst) to {hi} (best):"]
        lines += [f"- {c.name}: {c.description}" for c in self.criteria]
        example = "; ".join(f"{n}: N" for n in self.names)
        lines.append(f"Write the rating as {OPEN}{example}{CLOSE}")
        return "\n".join(lines)


def rubric_from_dict(data, *, where: str = "rubric") -> Rubric:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with name, scale and criteria, got {type(data).__name__}")
    unknown = set(data) - {"name", "scale", "criteria"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected name, scale, criteria)")
    criteria = data.get("criteria")
    if not isinstance(criteria, list):
        raise ValueError(f"{where}: criteria must be a list of {{name, description}} mappings, got {criteria!r}")
    parsed = []
    for i, c in enumerate(criteria):
        if not isinstance(c, dict) or set(c) - {"name", "description", "weight"} or "name" not in c:
            raise ValueError(f"{where}: criteria[{i}] must be a mapping with name, description and an optional "
                             f"weight, got {c!r}")
        parsed.append(Criterion(str(c["name"]), c.get("description", ""), c.get("weight", 1.0)))
    scale = data.get("scale")
    return Rubric(data.get("name", ""), tuple(scale) if isinstance(scale, list) else scale, tuple(parsed))


def load_rubric(spec: str | Path | Rubric) -> Rubric:
    """A Rubric from a YAML file, or a built-in by name ("story": pyvf/data/rubrics/story.yaml)."""
    if isinstance(spec, Rubric):
        return spec
    path = Path(spec)
    if not path.suffix and (BUILTIN_RUBRICS / f"{spec}.yaml").is_file():
        path = BUILTIN_RUBRICS / f"{spec}.yaml"
    if not path.is_file():
        builtins = sorted(p.stem for p in BUILTIN_RUBRICS.glob("*.yaml"))
        raise ValueError(f"rubric {str(spec)!r} is neither a file nor a built-in rubric ({', '.join(builtins)})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"rubric {path}: not valid YAML: {e}") from None
    return rubric_from_dict(data, where=f"rubric {path}")


def read_ratings(text: str, rubric: Rubric) -> tuple[dict[str, int] | None, str]:
    """(criterion -> rating, "") from the one rating block of `text`, or (None, why)."""
    ratings, _, why = read_ratings_why(text, rubric)
    return ratings, why


def read_ratings_why(text: str, rubric: Rubric) -> tuple[dict[str, int] | None, str, str]:
    """`read_ratings` with the kind of failure as well (for a verifier's counts):
    (ratings, "", "") or (None, kind, why)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    blocks = _BLOCK.findall(text)
    if not blocks:
        return None, "no_block", f"no complete {OPEN}...{CLOSE} block"
    if len(blocks) > 1:
        return None, "several_blocks", f"{len(blocks)} rating blocks (exactly one expected)"
    lo, hi = rubric.scale
    known = set(rubric.names)
    ratings: dict[str, int] = {}
    for entry in blocks[0].split(";"):
        entry = entry.strip()
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            return None, "malformed", f"entry {entry!r} is not 'criterion: integer'"
        name, value = m.group(1).lower(), int(m.group(2))
        if name not in known:
            return None, "unknown", f"unknown criterion {name!r}"
        if name in ratings:
            return None, "duplicate", f"criterion {name!r} rated twice"
        if not lo <= value <= hi:
            return None, "out_of_range", f"{name}: {value} is outside the scale [{lo}, {hi}]"
        ratings[name] = value
    missing = [n for n in rubric.names if n not in ratings]
    if missing:
        return None, "missing", f"no rating for {', '.join(missing)}"
    return ratings, "", ""


def parse_rating(text: str, rubric: Rubric) -> tuple[float | None, str]:
    """(score in [0, 1], "") from the one rating block of `text`, or (None, why)."""
    ratings, why = read_ratings(text, rubric)
    return (None, why) if ratings is None else (rubric.score(ratings), "")


__all__ = ["BUILTIN_RUBRICS", "CLOSE", "Criterion", "OPEN", "Rubric", "load_rubric", "parse_rating", "read_ratings",
           "read_ratings_why", "rubric_from_dict"]
