from pyvf.data.answers import is_equivalent
from pyvf.data.synthetic import answer_forms, generate


def test_synthetic_task_is_reproducible_and_has_equivalent_forms():
    a, b = generate(50, seed=3), generate(50, seed=3)
    assert a == b and a != generate(50, seed=4)
    for p in a:
        assert all(is_equivalent(form, [p.answers[0]]) for form in p.answers)
    assert answer_forms(__import__("fractions").Fraction(8, 5)) == ("8/5", "1.6")
    assert answer_forms(__import__("fractions").Fraction(1, 3)) == ("1/3",)
