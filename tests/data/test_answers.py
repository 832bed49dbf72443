"""Answer equivalence for the verifier baseline: math-verify (optional dependency) and
pyvf's normalizer (the fallback), on the same hand-written cases, including the cases
where they differ. docs/algorithms.md, "Verifier baseline"."""

import logging

import pytest

import pyvf.data.answers as answers
from pyvf.data.answers import answer_backend, equivalent_pair, is_equivalent, last_boxed, normalize

# (prediction, reference, math-verify says, normalizer says)
CASES = [
    ("8/5", "1.6", True, True),
    ("\\frac{8}{5}", "1.6", True, True),
    ("1.60", "8/5", True, True),
    (" 13 ", "13", True, True),
    ("13.0", "13", True, True),
    ("14", "13", False, False),
    ("1/0", "1", False, False),
    ("Paris", "paris", True, True),
    ("\\text{Paris}", "Paris", True, True),
    ("Paris", "Pairs", False, False),            # math-verify alone would read both as p*a*r*i*s
    ("0.333", "1/3", False, False),
    # where they differ: math-verify knows LaTeX structure the normalizer does not
    ("50\\%", "0.5", True, False),
    ("[1,2)", "\\left[1,2\\right)", True, False),
    ("\\{1,2\\}", "\\{2,1\\}", True, False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True, False),
    ("10\\text{ cm}", "10", True, False),
    ("2\\pi", "\\pi \\cdot 2", True, False),
    ("(1,2]", "[1,2]", False, False),
]


@pytest.fixture
def with_math_verify():
    pytest.importorskip("math_verify", reason="math-verify is an optional dependency (pip install 'pyvf[math]')")


@pytest.mark.parametrize("pred,ref,mv,norm", CASES)
def test_math_verify_backend(with_math_verify, pred, ref, mv, norm):
    assert equivalent_pair(pred, ref, backend="math-verify") is mv
    assert is_equivalent(pred, ["unrelated", ref]) is mv         # "auto" picks math-verify when installed


@pytest.mark.parametrize("pred,ref,mv,norm", CASES)
def test_normalizer_backend(pred, ref, mv, norm):
    assert equivalent_pair(pred, ref, backend="normalizer") is norm


def test_fallback_when_math_verify_is_unavailable(monkeypatch, caplog):
    """With math-verify switched off (as if not installed), "auto" is the normalizer, says so in the log
    once, and asking for math-verify explicitly is an error that names the package."""
    monkeypatch.setattr(answers, "USE_MATH_VERIFY", False)
    monkeypatch.setattr(answers, "_logged_backends", set())
    with caplog.at_level(logging.INFO, logger="pyvf"):
        assert answer_backend() == "normalizer"
        for pred, ref, _, norm in CASES:
            assert is_equivalent(pred, [ref]) is norm
    assert sum("normalizer" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="math-verify"):
        answer_backend("math-verify")
    with pytest.raises(ValueError, match="backend"):
        answer_backend("sympy")


def test_backend_choice_logged_once(with_math_verify, monkeypatch, caplog):
    monkeypatch.setattr(answers, "_logged_backends", set())
    with caplog.at_level(logging.INFO, logger="pyvf"):
        for pred, ref, _, _ in CASES:
            is_equivalent(pred, [ref])
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["answer equivalence"]
    assert "math-verify" in caplog.records[0].getMessage()


def test_none_never_matches():
    assert is_equivalent(None, ["1"]) is False and is_equivalent(None, ["1"], backend="normalizer") is False


@pytest.mark.parametrize("pred,refs,ok", [
    ("8/5", ["1.6"], True), ("1.60", ["8/5"], True), ("\\frac{8}{5}", ["1.6"], True),
    (" 13 ", ["13"], True), ("13.0", ["13"], True), ("14", ["13"], False), (None, ["1"], False),
    ("Paris", ["paris"], True), ("1/0", ["1"], False),
])
def test_answer_equivalence(pred, refs, ok):
    assert is_equivalent(pred, refs) is ok


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{8}{5}} c") == "\\frac{8}{5}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None
    assert normalize("\\boxed{1.5}") == normalize("3/2")


TEN = tuple(f"option {i}" for i in range(10))  # A-J, as MMLU-Pro


@pytest.mark.parametrize("text,options,letter", [
    ("so \\boxed{B}", (), "B"),
    ("\\boxed{\\text{(c)}} then", (), "C"),
    ("\\boxed{\\mathbf{B}}", (), "B"),
    ("\\boxed{B. Paris}", (), "B"),
    ("The answer is (D).", (), "D"),
    ("The correct answer is (b)", (), "B"),
    ("**Answer: C**", (), "C"),
    ("Final answer: $B$", (), "B"),
    ("The answer is \\(B\\)", (), "B"),
    ("The answer is option B", (), "B"),
    ("The answer is B because it is larger", (), "B"),
    ("I first thought A. The answer is C", (), "C"),          # the last commitment wins
    ("\\boxed{C} but on reflection the answer is (B)", (), "B"),
    ("The answer is (C). Answer: A is the trap option.", TEN, "C"),  # "A" as an article is prose
    ("Answer: I believe it is (C).", TEN, None),              # so is "I"
    ("the answer is a prime", (), None),
    ("\\boxed{7}", ("4", "6", "7", "9"), "C"),                # the option's own text
    ("\\boxed{I and III}", ("II only", "I and III", "III"), "B"),  # an option's text, not the letter I
    ("\\boxed{7}", (), None),
    ("The answer is (E)", ("x", "y", "z"), None),            # not an option of this question
    ("no answer here", (), None),
])
def test_choice_answer(text, options, letter):
    assert answers.choice_answer(text, options) == letter


@pytest.mark.parametrize("text,expected", [
    ("reasoning... <answer> \\boxed{Paris} </answer>", "Paris"),
    ("Reasoning...\n<answer>Paris</answer>", "Paris"),
    ("It must be so. The answer is Paris.\nAnything after", "Paris"),
    ("The answer is Paris. I am confident this answer is correct.", "Paris"),
    ("The answer is **Paris**.", "Paris"),
    ("**Answer:** Paris", "Paris"),
    ('Answer: "the mitochondria"', "the mitochondria"),
    ("The answer is 1.5 meters.", "1.5 meters"),
    ("Paris", "Paris"),
])
def test_text_answer(text, expected):
    assert answers.text_answer(text) == expected


def test_graded_answer_and_format_resolution():
    from pyvf.data.example import Example

    mc = Example("Q\nA. x\nB. y", ("B",), (1.0,), options=("x", "y"))
    assert answers.resolve_answer_format("auto", [mc]) == "choice"
    assert answers.resolve_answer_format("auto", [Example("Q", ("8",), (1.0,))]) == "math"
    assert answers.resolve_answer_format("auto", [Example("Q", ("C",), (1.0,))]) == "choice"  # letters, options inline
    assert answers.resolve_answer_format("auto", [mc, Example("Q", ("8",), (1.0,))]) == "mixed"
    assert answers.resolve_answer_format("text", [mc]) == "text"
    assert answers.graded_answer("The answer is (B)", ("B",), "auto") == ("B", True)  # decided per example
    assert answers.graded_answer("\\boxed{8}", ("8",), "auto") == ("8", True)
    with pytest.raises(ValueError, match="answer_format must be one of"):
        answers.resolve_answer_format("letters", [mc])
    assert answers.graded_answer("the answer is (b)", ("B",), "choice", options=mc.options) == ("B", True)
    assert answers.graded_answer("\\boxed{x}", ("B",), "choice", options=mc.options) == ("A", False)
    assert answers.graded_answer("\\boxed{8/5}", ("1.6",), "math") == ("8/5", True)
    assert answers.graded_answer("The answer is: PARIS.", ("Paris",), "text") == ("PARIS", True)
    assert answers.graded_answer("", ("Paris",), "text") == ("", False)
