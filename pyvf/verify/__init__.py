"""Verifiers: anything that scores completions, for rewards, best-of-N and filtering
("verifier engineering"; README: Verifiers).

    from pyvf.verify import get_verifier
    v = get_verifier("rule")                                   # math answer equivalence
    v = get_verifier("self_rubric", rubric="story")            # the model's own rating
    v = get_verifier("verifree", model=model, tokenizer=tok)   # pi(reference | prompt, reasoning)
    v = get_verifier("rule + 0.5*majority")                    # a weighted sum
    v = get_verifier("python:my_rewards:length")               # a function of your own
    scores = v(prompts, completions, references)               # list[float]

Names: `rule`, `majority`, `self_rubric` (or `selfrubric`), `verifree`, `python:module:function`
and any added with `register_verifier`. A spec is one name or a sum of terms joined by
`+`, each term a name with an optional weight before or after a `*` (`0.5*majority`,
`majority*0.5`, `rule+-0.2*majority`); a list may mix specs, verifiers and
(spec or verifier, weight) pairs. One unweighted term gives that verifier itself; more
give `Weighted`. The keyword arguments (`context`) go to every named verifier, each
taking what it needs: `backend` (rule, majority), `rubric`, `rate`, `rating_prompt`
(self_rubric), `model` or `policy`, `tokenizer`, `marker`, `answer_template`,
`temperature`, `max_seq_len`, `token_budget`, `prompt_special_tokens`, `reward_form` (verifree).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pyvf.verify.base import AnswerVerifier, BaseVerifier, Verifier, check_batch
from pyvf.verify.majority import MajorityVerifier, answer_classes, majority_vote
from pyvf.verify.python import PythonVerifier, load_function
from pyvf.verify.rubric import (
    Criterion, Rubric, SelfRubric, answer_part, load_rubric, model_rater, parse_rating, read_ratings,
)
from pyvf.verify.rule import RuleVerifier
from pyvf.verify.verifree import VerifreeVerifier
from pyvf.verify.weighted import Weighted


def _only(context: dict, keys: tuple[str, ...]) -> dict:
    return {k: context[k] for k in keys if k in context}


def _self_rubric(**context) -> SelfRubric:
    if context.get("rubric") is None:
        raise ValueError("rubric: the self_rubric verifier needs a rubric (a YAML file, a built-in name such as "
                         "'story', or a Rubric)")
    return SelfRubric(context["rubric"], **_only(context, ("rate", "rating_prompt")))


_REGISTRY: dict[str, Callable[..., Verifier]] = {
    "rule": lambda **c: RuleVerifier(**_only(c, ("backend",))),
    "majority": lambda **c: MajorityVerifier(**_only(c, ("backend",))),
    "self_rubric": _self_rubric,
    "selfrubric": _self_rubric,
    "verifree": lambda **c: VerifreeVerifier(**_only(c, (
        "model", "tokenizer", "policy", "marker", "answer_template", "temperature", "max_seq_len", "token_budget",
        "prompt_special_tokens", "reward_form"))),
}

# "+" joins terms, except in a number's exponent (1e+3).
_PLUS = re.compile(r"(?<![0-9][eE])\+")


def register_verifier(name: str, factory: Callable[..., Verifier]) -> None:
    """Makes `name` usable in specs; `factory(**context)` builds the verifier (it gets
    every keyword given to get_verifier and takes what it needs)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) or name == "python":
        raise ValueError(f"name must be letters, digits, _ . or - (not 'python'), got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory must be callable (**context) -> verifier, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def verifier_names() -> list[str]:
    return list(_REGISTRY) + ["python:module:function"]


def get_verifier(spec, **context) -> Verifier:
    """The verifier a spec names (see the module docstring)."""
    terms = _terms(spec)
    if not terms:
        raise ValueError(f"verifier spec {spec!r} names no verifier")
    built = [(_build(item, context), w) for item, w in terms]
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][0]
    return Weighted(built)


def _terms(spec) -> list[tuple[object, float]]:
    if isinstance(spec, str):
        return [_term(t.strip(), spec) for t in _PLUS.split(spec) if t.strip()] if spec.strip() else []
    if _is_verifier(spec):
        return [(spec, 1.0)]
    if isinstance(spec, (list, tuple)):
        out = []
        for i, item in enumerate(spec):
            if isinstance(item, (list, tuple)) and len(item) == 2 and not isinstance(item[1], str):
                inner, w = item
                if isinstance(w, bool) or not isinstance(w, (int, float)):
                    raise ValueError(f"verifier spec[{i}]: weight must be a number, got {w!r}")
                out += [(v, wv * float(w)) for v, wv in _terms(inner)]
            else:
                out += _terms(item)
        return out
    raise ValueError(f"verifier spec must be a string, a verifier or a list of them, got {type(spec).__name__}")


def _term(term: str, spec: str) -> tuple[str, float]:
    pieces = [p.strip() for p in term.split("*")]
    if len(pieces) == 1:
        return pieces[0], 1.0
    if len(pieces) == 2:
        for number, name in ((pieces[0], pieces[1]), (pieces[1], pieces[0])):
            try:
                return name, float(number)
            except ValueError:
                continue
    raise ValueError(f"verifier spec {spec!r}: term {term!r} must be NAME, WEIGHT*NAME or NAME*WEIGHT")


def _is_verifier(obj) -> bool:
    return callable(obj) and isinstance(getattr(obj, "name", None), str)


def _build(item, context: dict) -> Verifier:
    if _is_verifier(item):
        return item
    name = item
    if name.startswith("python:"):
        return PythonVerifier(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(verifier_names())}")
    return _REGISTRY[name](**context)


__all__ = [
    "AnswerVerifier", "BaseVerifier", "Criterion", "MajorityVerifier", "PythonVerifier", "Rubric", "RuleVerifier",
    "SelfRubric",
    "VerifreeVerifier", "Verifier", "Weighted", "answer_classes", "answer_part", "check_batch", "get_verifier",
    "load_function", "load_rubric", "majority_vote", "model_rater", "parse_rating", "read_ratings",
    "register_verifier", "verifier_names",
]
