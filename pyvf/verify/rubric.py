"""`self_rubric`: the self-rated rubric reward (docs/DESIGN.md 1.8, "reverse incentive").

The model writes its answer, then rates that answer against a rubric's explicit
criteria; the rating is the reward. A rubric is a YAML file:

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

Without a rater, the rating is read from the completion itself (answer + rating). With
`rate` (a callable that maps rating prompts to generated texts: a frozen or slow copy
of the policy, another model), the completion's own rating block is cut off, the rater
sees the prompt and the answer, and its output is parsed instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from pyvf.verify.base import BaseVerifier, check_batch

OPEN, CLOSE = "<rating>", "</rating>"
BUILTIN_RUBRICS = Path(__file__).resolve().parent.parent / "data" / "rubrics"

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
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"rubric {path}: not valid YAML: {e}") from None
    return rubric_from_dict(data, where=f"rubric {path}")


def read_ratings(text: str, rubric: Rubric) -> tuple[dict[str, int] | None, str]:
    """(criterion -> rating, "") from the one rating block of `text`, or (None, why)."""
    ratings, _, why = _read(text, rubric)
    return ratings, why


# Why a rating could not be read: (kind, for the verifier's counts; message).
def _read(text: str, rubric: Rubric) -> tuple[dict[str, int] | None, str, str]:
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


def answer_part(completion: str) -> str:
    """The completion without its own rating: everything before the first `<rating>`."""
    pos = completion.find(OPEN)
    return completion if pos < 0 else completion[:pos].rstrip()


def default_rating_prompt(prompt: str, answer: str) -> str:
    """What the rater continues: the prompt and the answer as the policy wrote it, then a
    new line, the very context in which the policy rates itself (so a copy of the policy
    can rate). Pass `rating_prompt=` to give another rater the rubric's instructions."""
    return f"{prompt}{answer}\n"


class SelfRubric(BaseVerifier):
    """stats: `scored`, `unparsable` (scored 0) and, per kind of failure, `why/<kind>`
    (no_block, several_blocks, malformed, unknown, duplicate, out_of_range, missing);
    `last_reasons` holds the reason per completion of the last call ("" where the rating
    was read)."""

    name = "self_rubric"

    def __init__(self, rubric: str | Path | Rubric, *, rate: Callable[[list[str]], list[str]] | None = None,
                 rating_prompt: Callable[[str, str], str] = default_rating_prompt):
        super().__init__()
        self.rubric = load_rubric(rubric)
        if rate is not None and not callable(rate):
            raise ValueError(f"rate must be a callable (rating prompts -> texts), got {type(rate).__name__}")
        if not callable(rating_prompt):
            raise ValueError(f"rating_prompt must be a callable (prompt, answer) -> text, got "
                             f"{type(rating_prompt).__name__}")
        self.rate = rate
        self.rating_prompt = rating_prompt
        self.last_reasons: list[str] = []

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, _ = check_batch(prompts, completions, references, who=self.name)
        if self.rate is None:
            texts = completions
        else:
            asks = [self.rating_prompt(p, answer_part(c)) for p, c in zip(prompts, completions)]
            texts = self.rate(asks)
            if hasattr(texts, "tolist"):
                texts = texts.tolist()
            if not isinstance(texts, (list, tuple)) or len(texts) != len(asks) or not all(
                    isinstance(t, str) for t in texts):
                raise ValueError(f"rate must return one string per rating prompt ({len(asks)}), got "
                                 f"{type(texts).__name__} of {len(texts) if hasattr(texts, '__len__') else '?'}")
        scores, reasons = [], []
        for text in texts:
            ratings, kind, why = _read(text, self.rubric)
            reasons.append(why)
            if ratings is None:
                self.count("unparsable")
                self.count(f"why/{kind}")
            scores.append(0.0 if ratings is None else self.rubric.score(ratings))
        self.last_reasons = reasons
        self.count("scored", len(scores))
        return scores


def model_rater(model, tokenizer, *, max_new_tokens: int = 64,
                batch_size: int = 32) -> Callable[[list[str]], list[str]]:
    """A `rate` callable from a causal LM: greedy continuation of each rating prompt,
    stopping after `</rating>` (a frozen copy of the policy, or another model)."""
    from pyvf.chat import stop_token_ids
    from pyvf.train.rollout import greedy

    def rate(asks: list[str]) -> list[str]:
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in asks]
        out = greedy(model, tokenizer, ids, max_new_tokens, batch_size=batch_size, stop=[CLOSE],
                     stop_token_ids=stop_token_ids(model, tokenizer))
        return [tokenizer.decode(o, skip_special_tokens=True) for o in out]

    return rate


__all__ = ["CLOSE", "Criterion", "OPEN", "Rubric", "SelfRubric", "answer_part", "default_rating_prompt",
           "load_rubric", "model_rater", "parse_rating", "read_ratings", "rubric_from_dict"]
