"""Reading and comparing final answers: the last \\boxed{...} of a text, normalized
so that equivalent forms (8/5, 1.6, 1.60, \\frac{8}{5}) compare equal."""

from __future__ import annotations

import re
from fractions import Fraction

_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} in text (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _as_number(s: str) -> Fraction | None:
    s = s.replace(",", "").replace(" ", "").replace("$", "")
    m = _FRAC.match(s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = _as_number(num), _as_number(den)
        return a / b if a is not None and b not in (None, 0) else None
    if _NUMBER.match(s):
        return Fraction(s)
    return None


def normalize(answer: str) -> str | Fraction:
    """A number as an exact Fraction; anything else as lower-case text with the
    whitespace collapsed and an outer \\boxed{} or \\text{} removed."""
    s = answer.strip()
    inner = last_boxed(s) if s.startswith("\\boxed{") else None
    if inner is not None:
        s = inner.strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip().rstrip(".")
    number = _as_number(s)
    if number is not None:
        return number
    return " ".join(s.lower().split())


def is_equivalent(prediction: str | None, references: list[str]) -> bool:
    if prediction is None:
        return False
    p = normalize(prediction)
    return any(p == normalize(r) for r in references)
