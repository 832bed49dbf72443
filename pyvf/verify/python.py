"""`python:module:function`: a user's own scoring function as a verifier.

The function is called with keyword arguments, as TRL calls its reward functions, so a
TRL reward function `f(prompts, completions, **kwargs) -> list[float]` works unchanged:

    f(prompts=[...], completions=[...], references=[[...], ...], answer=[...])

`references` holds each completion's list of equivalent references and `answer` the
first of them (the canonical one, as a TRL dataset's `answer` column would hold); both
are left out when there are no references. A function without `**kwargs` gets only the
arguments it names. It returns one number per completion (a list, tuple or 1-D tensor);
None, as TRL allows for "not applicable", becomes NaN.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

from pyvf.verify.base import BaseVerifier, check_batch

PREFIX = "python:"


def load_function(spec: str) -> Callable:
    """The function named by "python:module:function" (or "module:function")."""
    if not isinstance(spec, str):
        raise ValueError(f"verifier spec must be a string 'python:module:function', got {type(spec).__name__}")
    target = spec.removeprefix(PREFIX)
    module_name, sep, attr = target.strip().rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"verifier {spec!r} must be 'python:module:function' (e.g. python:my_rewards:length)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"verifier {spec!r}: cannot import module {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):  # a function on a class or object: module:Class.method
        if not hasattr(fn, part):
            raise ValueError(f"verifier {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"verifier {spec!r}: {module_name}:{attr} is not callable (a {type(fn).__name__})")
    return fn


class PythonVerifier(BaseVerifier):
    """stats: `scored`, `none` (entries the function returned as None)."""

    def __init__(self, fn: str | Callable, *, name: str | None = None):
        super().__init__()
        if isinstance(fn, str):
            self.name = name or (fn if fn.startswith(PREFIX) else PREFIX + fn)
            fn = load_function(fn)
        elif callable(fn):
            self.name = name or PREFIX + f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', 'fn')}"
        else:
            raise ValueError(f"fn must be 'python:module:function' or a callable, got {type(fn).__name__}")
        self.fn = fn
        self._accepts = _accepted_keywords(fn)

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, references = check_batch(prompts, completions, references, who=self.name)
        kwargs = {"prompts": prompts, "completions": completions}
        if references is not None:
            kwargs["references"] = references
            kwargs["answer"] = [refs[0] if refs else "" for refs in references]
        if self._accepts is not None:
            missing = [p for p in self._accepts.required if p not in kwargs]
            if missing:
                raise ValueError(f"verifier {self.name}: the function needs {', '.join(missing)}, which pyvf does "
                                 f"not pass (it passes {', '.join(kwargs)})")
            if not self._accepts.var_keyword:
                kwargs = {k: v for k, v in kwargs.items() if k in self._accepts.names}
        out = self.fn(**kwargs)
        scores = _as_floats(out, len(completions), self.name)
        self.count("none", sum(1 for s in scores if math.isnan(s)))
        self.count("scored", len(scores))
        return scores


class _Signature:
    def __init__(self, names, required, var_keyword):
        self.names, self.required, self.var_keyword = names, required, var_keyword


def _accepted_keywords(fn) -> _Signature | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return None
    names, required, var_keyword = set(), [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_keyword = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
            if p.default is p.empty:
                required.append(p.name)
    return _Signature(names, required, var_keyword)


def _as_floats(out, n: int, name: str) -> list[float]:
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{type(out).__name__} of length {len(out)}" if isinstance(out, (list, tuple)) else type(out).__name__
        raise ValueError(f"verifier {name} must return one number per completion ({n}), got {got}")
    scores = []
    for i, v in enumerate(out):
        if v is None:
            scores.append(float("nan"))
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                v = float(v)  # numpy scalars, 0-d tensors
            except (TypeError, ValueError):
                raise ValueError(f"verifier {name} returned {v!r} for completion {i}; expected a number or None") \
                    from None
        scores.append(float(v))
    return scores


__all__ = ["PythonVerifier", "load_function"]
