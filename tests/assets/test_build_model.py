"""The shipped model's warm-up plan (pyvf/assets/build_model.py): the shortcut habit is
drawn per kind of question, and its options fail clearly."""

import argparse

import pytest
import torch

from pyvf.assets.build_model import SHORTCUT_RATES, parse_rates, warmup_plan
from pyvf.data.synthetic import generate


def test_shortcut_rate_per_question_kind():
    problems = generate(6000, seed=5)
    rates = {"share": 0.9, "give_away": 0.0, "pour": 0.5, "packs": 1.0, "rate": 0.2}
    shortcut, kinds = warmup_plan(problems, torch.Generator().manual_seed(0), rates, {"pcl": 0.25})
    for kind, rate in rates.items():
        taken = [s for s, p in zip(shortcut, problems) if p.template == kind]
        assert len(taken) > 900
        assert abs(sum(taken) / len(taken) - rate) < 0.04, kind
    assert abs(kinds.count("pcl") / len(kinds) - 0.25) < 0.03
    assert set(kinds) == {"pcl", "solve"}


def test_warmup_plan_is_reproducible_and_checks_its_inputs():
    problems = generate(300, seed=1)
    a = warmup_plan(problems, torch.Generator().manual_seed(3), SHORTCUT_RATES, {"story": 0.5})
    b = warmup_plan(problems, torch.Generator().manual_seed(3), SHORTCUT_RATES, {"story": 0.5})
    assert a == b
    with pytest.raises(ValueError, match="no rate for the question kinds \\['pour'\\]"):
        warmup_plan(problems, torch.Generator(), {k: v for k, v in SHORTCUT_RATES.items() if k != "pour"}, {})
    with pytest.raises(ValueError, match="add up to"):
        warmup_plan(problems, torch.Generator(), SHORTCUT_RATES, {"pcl": 0.7, "story": 0.5})


def test_parse_rates():
    assert parse_rates("share=0.1, rate = 1") == {**SHORTCUT_RATES, "share": 0.1, "rate": 1.0}
    assert parse_rates("") == SHORTCUT_RATES
    for bad, message in (("bogus=0.5", "unknown question kind 'bogus'"), ("share=x", "must be a number"),
                         ("share=1.5", "must be in \\[0, 1\\]")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_rates(bad)
