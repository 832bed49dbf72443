"""Training methods, one file each, and the registry `--objective` reads.

    from pyvf.objectives import get_objective, register_objective
    register_objective("mine", MyObjective)        # or --objective my_package.module:MyObjective

Every objective implements `pyvf.objectives.base.Objective`; the trainer knows none by
name. The formulas of each method are in its file (docs/algorithms.md explains them).
"""

from __future__ import annotations

import importlib

from pyvf.objectives.base import Objective, Sample, StepContext, TrainSequences

_REGISTRY: dict[str, type[Objective] | str] = {
    "verifree": "pyvf.objectives.verifree:VeriFree",
    "jepo": "pyvf.objectives.verifree:JEPO",
    "rlpr": "pyvf.objectives.rlpr:RLPR",
    "nover": "pyvf.objectives.nover:NOVER",
    "verifier": "pyvf.objectives.verifier:VerifierBaseline",
    "pcl": "pyvf.objectives.pcl:PCL",
    "rzero": "pyvf.objectives.rzero:RZeroChallenger",
    "selfrubric": "pyvf.objectives.selfrubric:SelfRubric",
}


def register_objective(name: str, cls: type[Objective]) -> None:
    """Makes `--objective name` train with `cls` (an Objective subclass)."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"objective {name!r} must be a subclass of pyvf.objectives.Objective, got {cls!r}")
    _REGISTRY[name] = cls


def objective_names() -> list[str]:
    return list(_REGISTRY)


def get_objective(name: str) -> type[Objective]:
    """The class registered as `name`, or `module:Class` imported."""
    target = _REGISTRY.get(name, name)
    if isinstance(target, type):
        return target
    module, sep, attr = target.partition(":")
    if not sep:
        raise ValueError(f"objective must be one of {', '.join(_REGISTRY)} or module:Class, got {name!r}")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"objective {name!r} cannot be imported: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"objective {name!r} is not a subclass of pyvf.objectives.Objective")
    return cls


__all__ = ["Objective", "Sample", "StepContext", "TrainSequences", "get_objective", "objective_names",
           "register_objective"]
