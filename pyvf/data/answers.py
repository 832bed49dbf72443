"""Reading and comparing final answers: the last \\boxed{...} of a text, and answer
equivalence for the verifier baseline (docs/algorithms.md, "Verifier baseline").

Two backends decide whether a predicted answer matches a reference:

- "math-verify" (PyPI `math-verify`, the optional extra `pyvf[math]`): LaTeX, fractions,
  percentages, sets, intervals, units in \\text{}, symbolic equality. Used when installed.
- "normalizer": pyvf's own exact comparison (whitespace, \\boxed, \\text, numbers such as
  8/5, 1.6 and \\frac{8}{5} as exact fractions, case-insensitive text). Always available,
  and the fallback when math-verify is not installed.

With math-verify, an answer counts as equivalent when the normalizer already says so or
math-verify does; answers that read as words (a run of two or more letters outside a
LaTeX command or \\text{}) are compared by the normalizer only, because math-verify parses
"Paris" as the product of the symbols P, a, r, i, s (so it would equal "Pairs").
Each backend is logged the first time it is used (logger "pyvf").
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

log = logging.getLogger("pyvf")

_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_TEXT_BLOCK = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}")
_WORD = re.compile(r"[A-Za-z]{2,}")

BACKENDS = ("auto", "math-verify", "normalizer")

# Set to False to force the normalizer everywhere (tests use it to exercise the fallback).
USE_MATH_VERIFY = True

_math_verify = None           # the imported module, once looked up
_math_verify_looked_up = False
_logged_backends: set[str] = set()


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


def _load_math_verify():
    global _math_verify, _math_verify_looked_up
    if not _math_verify_looked_up:
        _math_verify_looked_up = True
        try:
            import math_verify
            _math_verify = math_verify
        except ImportError:
            _math_verify = None
    return _math_verify


def answer_backend(backend: str = "auto") -> str:
    """The backend `is_equivalent` uses for `backend`: "math-verify" or "normalizer".
    "auto" picks math-verify when it is installed (and USE_MATH_VERIFY is set); asking
    for "math-verify" explicitly when it is missing is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "normalizer":
        chosen = "normalizer"
    else:
        available = USE_MATH_VERIFY and _load_math_verify() is not None
        if backend == "math-verify" and not available:
            raise ValueError("backend='math-verify' needs the package math-verify (pip install 'pyvf[math]')")
        chosen = "math-verify" if available else "normalizer"
    if chosen not in _logged_backends:
        _logged_backends.add(chosen)
        if chosen == "math-verify":
            from importlib.metadata import version
            log.info("answer equivalence: math-verify %s (with pyvf's normalizer for textual answers)",
                     version("math-verify"))
        else:
            log.info("answer equivalence: pyvf's normalizer (install math-verify, pip install 'pyvf[math]', "
                     "for LaTeX, sets, intervals and percentages)")
    return chosen


def _reads_as_words(answer: str) -> bool:
    stripped = _LATEX_COMMAND.sub(" ", _TEXT_BLOCK.sub(" ", answer))
    return _WORD.search(stripped) is not None


def _math_verify_equal(prediction: str, reference: str) -> bool:
    mv = _load_math_verify()
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    try:
        gold = mv.parse(f"${reference}$", parsing_timeout=timeout)
        pred = mv.parse(f"${prediction}$", parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(mv.verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # a parser failure on odd input is a non-match, never a crash mid-training
        return False


def equivalent_pair(prediction: str, reference: str, *, backend: str = "auto") -> bool:
    """Whether one predicted answer matches one reference under `backend`."""
    if normalize(prediction) == normalize(reference):
        return True
    if answer_backend(backend) == "normalizer":
        return False
    if _reads_as_words(prediction) or _reads_as_words(reference):
        return False
    return _math_verify_equal(prediction, reference)


def is_equivalent(prediction: str | None, references: list[str], *, backend: str = "auto") -> bool:
    """True when `prediction` matches any of `references` (None never matches)."""
    if prediction is None:
        return False
    return any(equivalent_pair(prediction, r, backend=backend) for r in references)


def boxed_correct(completions: list[str], references: list[list[str]], *, backend: str = "auto") -> list[bool]:
    """Whether the last \\boxed{...} of each completion is equivalent to one of its
    references (a completion without one is not): the rule checker's verdicts."""
    if len(completions) != len(references):
        raise ValueError(f"completions and references must have the same length, got {len(completions)} "
                         f"and {len(references)}")
    return [is_equivalent(last_boxed(c), list(r), backend=backend) for c, r in zip(completions, references)]


# How evaluation reads the answer a completion commits to (`graded_answer`).
ANSWER_FORMATS = ("auto", "math", "choice", "text")

# Where a completion states its answer: "the answer is", "final answer:", "Answer:".
_STATEMENT = re.compile(r"(?:\b(?:the|final|correct|my)\s+answer\s+is\b\s*:?|\banswer\s*[:：])", re.IGNORECASE)
# Markup around a stated answer: bold, math delimiters, \text{}-like commands, brackets, quotes.
_DECORATION = re.compile(r"\*\*|__|\$|\\\(|\\\)|\\(?:text|textbf|mathbf|mathrm|mbox)\{|[{}\[\]\"'`“”]")
_OPTION_WORD = re.compile(r"^(?:option|choice)\s+", re.IGNORECASE)
# A letter that stands alone: "B", "(B)", "B.", "B:", "B)" and then anything or nothing.
_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?=$|[.:)]|\s)")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_TAGS = re.compile(r"</?answer>")


def _undecorated(s: str) -> str:
    return " ".join(_DECORATION.sub(" ", s).split())


def _stated_letter(rest: str) -> str | None:
    """The option letter at the start of what follows an answer statement, or None: a
    capital letter standing alone, or any letter in parentheses; a bare "A" or "I"
    followed by a lower-case word is prose ("Answer: A is wrong", "Answer: I think")."""
    text = _OPTION_WORD.sub("", _undecorated(rest[:40]))
    m = _LETTER.match(text)
    if m is None:
        return None
    letter, parenthesized = m.group(1), text.startswith("(")
    if not parenthesized:
        if letter.islower():
            return None
        if letter in "AI" and re.match(r"^[AI]\s+[a-z]", text):
            return None
    return letter.upper()


def _boxed_letter(inner: str, options: tuple[str, ...] | list[str]) -> str | None:
    """The option a \\boxed{...} names: exactly one option's text (tried first: "I and
    III" is an option, not the letter I), else a letter standing alone ("B", "(B)",
    "B. text")."""
    if options:
        matches = [chr(ord("A") + i) for i, o in enumerate(options) if normalize(o) == normalize(inner)]
        if len(matches) == 1:
            return matches[0]
    m = _LETTER.match(_OPTION_WORD.sub("", _undecorated(inner)))
    return m.group(1).upper() if m else None


def choice_answer(completion: str, options: tuple[str, ...] | list[str] = ()) -> str | None:
    """The option letter a completion commits to: whichever comes last of its last
    \\boxed{...} (a letter, "(B)", "B. text", or exactly one option's text) and an
    answer statement ("the answer is (B)", "Answer: **B**", "final answer: $B$", "the
    answer is option B"). Only the letters of `options` count when they are given."""
    letters = {chr(ord("A") + i) for i in range(len(options))} if options else None
    found: list[tuple[int, str]] = []
    boxed = last_boxed(completion)
    if boxed is not None:
        letter = _boxed_letter(boxed, options)
        if letter is not None:
            found.append((completion.rfind("\\boxed{"), letter))
    for m in _STATEMENT.finditer(completion):
        letter = _stated_letter(completion[m.end():])
        if letter is not None:
            found.append((m.start(), letter))
    found = [(pos, letter) for pos, letter in found if letters is None or letter in letters]
    return max(found)[1] if found else None


def text_answer(completion: str) -> str:
    """The final answer of a free-text completion: its last \\boxed{...}, else its last
    <answer>...</answer>, else what its last answer statement ("the answer is", "final
    answer:", "Answer:") says, to the end of that sentence, else the whole completion;
    markup (bold, $, quotes) removed."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return _undecorated(boxed)
    blocks = _ANSWER_BLOCK.findall(completion)
    if blocks:
        return _undecorated(blocks[-1])
    stated = list(_STATEMENT.finditer(completion))
    if stated:
        rest = completion[stated[-1].end():].split("\n")[0]
        rest = re.split(r"(?<=[^\s.])\.(?:\s|$)", rest)[0]  # to the end of the sentence (not 1.5)
        return _undecorated(_ANSWER_TAGS.sub("", rest))
    return _undecorated(_ANSWER_TAGS.sub("", completion))


def _is_choice(options, references) -> bool:
    """Multiple choice: the question has options, or its references are capital letters."""
    return bool(options) or bool(references) and all(len(r) == 1 and r.isupper() for r in references)


def resolve_answer_format(answer_format: str, examples) -> str:
    """`answer_format` as a data set's examples are graded: "auto" is "choice" for a
    multiple-choice example (it has options, or its references are single capital
    letters) and "math" for the others (\\boxed{} answers compared by `is_equivalent`,
    text included), decided per example; "mixed" when a set holds both."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if answer_format != "auto":
        return answer_format
    kinds = {"choice" if _is_choice(ex.options, ex.answers) else "math" for ex in examples}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def graded_answer(completion: str, references: list[str] | tuple[str, ...], answer_format: str, *,
                  options: tuple[str, ...] = (), backend: str = "auto") -> tuple[str | None, bool]:
    """(the answer read from `completion`, whether it matches one of `references`) under
    an answer format: "math" (last \\boxed{}, `is_equivalent`), "choice" (the option
    letter, `choice_answer`), "text" (`text_answer`, normalized exact match) or "auto"
    (choice when there are options or the references are letters, else math)."""
    if answer_format == "auto":
        answer_format = "choice" if _is_choice(options, references) else "math"
    if answer_format == "math":
        prediction = last_boxed(completion)
        return prediction, is_equivalent(prediction, list(references), backend=backend)
    if answer_format == "choice":
        prediction = choice_answer(completion, options)
        return prediction, prediction is not None and prediction in {r.strip().strip("()").upper() for r in references}
    if answer_format == "text":
        prediction = text_answer(completion)
        return prediction, bool(prediction) and any(normalize(prediction) == normalize(r) for r in references)
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


__all__ = ["ANSWER_FORMATS", "BACKENDS", "answer_backend", "boxed_correct", "choice_answer", "equivalent_pair",
           "graded_answer", "is_equivalent", "last_boxed", "normalize", "resolve_answer_format", "text_answer"]
