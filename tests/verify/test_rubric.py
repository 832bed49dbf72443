"""Rubrics: loading, the rating format (malformed, out-of-range, missing, repeated),
scores by hand, and the self_rubric verifier with and without a rater."""

import math

import pytest

from pyvf.verify import Criterion, Rubric, SelfRubric, get_verifier, load_rubric, parse_rating, read_ratings
from pyvf.verify.rubric import answer_part, default_rating_prompt, rubric_from_dict

STORY = load_rubric("story")
FULL = "<rating>structure: 5; descriptive: 4; person: 5; tone: 2; words: 3</rating>"


def test_builtin_story_rubric():
    assert STORY.name == "story"
    assert STORY.scale == (1, 5)
    assert STORY.names == ("structure", "descriptive", "person", "tone", "words")
    assert all(c.description and c.weight == 1.0 for c in STORY.criteria)


def test_parse_rating_hand_computed():
    # (4 + 3 + 4 + 1 + 2) / 4 / 5 criteria
    assert parse_rating("A story.\n" + FULL, STORY) == (pytest.approx(14 / 20), "")
    lowest = "<rating>" + "; ".join(f"{n}: 1" for n in STORY.names) + "</rating>"
    assert parse_rating(lowest, STORY) == (0.0, "")
    top = "<rating>" + "; ".join(f"{n}: 5" for n in STORY.names) + "</rating>"
    assert parse_rating(top, STORY) == (1.0, "")


@pytest.mark.parametrize("text", [
    "<rating>words:3;tone:2;person:5;descriptive:4;structure:5;</rating>",          # any order, no spaces, trailing ;
    "<rating>\n  Structure : 5 ;\n descriptive: 4; person: 5; TONE: 2; words: 3\n</rating>",  # case, new lines
    "prefix </rating> text <rating>structure: 5; descriptive: 4; person: 5; tone: 2; words: 3</rating> after",
])
def test_parse_rating_tolerates_spacing_order_and_case(text):
    assert parse_rating(text, STORY) == (pytest.approx(0.7), "")


@pytest.mark.parametrize("text, why", [
    ("a story with no rating", "no complete"),
    ("<rating>structure: 5; descriptive: 4", "no complete"),                       # cut off (truncated)
    (FULL + FULL, "2 rating blocks"),
    ("<rating>structure: 5; descriptive: 4; person: 5; tone: 2</rating>", "no rating for words"),
    ("<rating></rating>", "no rating for structure, descriptive, person, tone, words"),
    ("<rating>structure: 6; descriptive: 4; person: 5; tone: 2; words: 3</rating>", "outside the scale"),
    ("<rating>structure: 0; descriptive: 4; person: 5; tone: 2; words: 3</rating>", "outside the scale"),
    ("<rating>structure: -3; descriptive: 4; person: 5; tone: 2; words: 3</rating>", "outside the scale"),
    ("<rating>structure: 4.5; descriptive: 4; person: 5; tone: 2; words: 3</rating>", "not 'criterion: integer'"),
    ("<rating>structure: five; descriptive: 4; person: 5; tone: 2; words: 3</rating>", "not 'criterion: integer'"),
    ("<rating>structure 5; descriptive: 4; person: 5; tone: 2; words: 3</rating>", "not 'criterion: integer'"),
    ("<rating>structure: 5, descriptive: 4; person: 5; tone: 2; words: 3</rating>", "not 'criterion: integer'"),
    ("<rating>structure: 5; structure: 4; person: 5; tone: 2; words: 3</rating>", "rated twice"),
    ("<rating>structure: 5; plot: 4; person: 5; tone: 2; words: 3</rating>", "unknown criterion 'plot'"),
])
def test_parse_rating_rejects(text, why):
    score, reason = parse_rating(text, STORY)
    assert score is None
    assert why in reason
    assert read_ratings(text, STORY) == (None, reason)


def test_weighted_criteria_and_custom_scale():
    r = Rubric("r", (0, 10), (Criterion("a", "first", 3.0), Criterion("b", "second")))
    assert parse_rating("<rating>a: 10; b: 0</rating>", r) == (pytest.approx(0.75), "")
    assert parse_rating("<rating>a: 5; b: 10</rating>", r) == (pytest.approx((3 * 0.5 + 1) / 4), "")
    assert r.render({"b": 2, "a": 7}) == "<rating>a: 7; b: 2</rating>"
    with pytest.raises(ValueError, match=r"ratings\['a'\] must be an integer in \[0, 10\]"):
        r.render({"a": 11, "b": 2})
    with pytest.raises(ValueError, match="no rating for b"):
        r.render({"a": 1})


def test_render_round_trips_and_instructions_name_every_criterion():
    ratings = {"structure": 3, "descriptive": 5, "person": 1, "tone": 4, "words": 2}
    assert read_ratings("story " + STORY.render(ratings), STORY) == (ratings, "")
    text = STORY.instructions()
    assert all(n in text for n in STORY.names) and "<rating>" in text and "from 1" in text


@pytest.mark.parametrize("data, why", [
    ({"name": "x", "scale": [5, 1], "criteria": [{"name": "a", "description": "d"}]}, "min < max"),
    ({"name": "x", "scale": [1.5, 5], "criteria": [{"name": "a", "description": "d"}]}, "two integers"),
    ({"name": "x", "scale": [1, 5], "criteria": []}, "at least one criterion"),
    ({"name": "x", "scale": [1, 5], "criteria": [{"name": "a", "description": "d"}] * 2}, "listed twice"),
    ({"name": "x", "scale": [1, 5], "criteria": [{"name": "A b", "description": "d"}]}, "lower case"),
    ({"name": "x", "scale": [1, 5], "criteria": [{"name": "a"}]}, "non-empty description"),
    ({"name": "x", "scale": [1, 5], "criteria": [{"name": "a", "description": "d", "weight": 0}]}, "weight"),
    ({"name": "x", "scale": [1, 5], "criteria": [{"name": "a", "description": "d", "extra": 1}]}, r"criteria\[0\]"),
    ({"name": "x", "scale": [1, 5], "criteria": "a"}, "criteria must be a list"),
    ({"scale": [1, 5], "criteria": [{"name": "a", "description": "d"}]}, "rubric name"),
    ({"name": "x", "scale": [1, 5], "criteria": [], "levels": 3}, "unknown key"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_bad_rubrics(data, why):
    with pytest.raises(ValueError, match=why):
        rubric_from_dict(data)


def test_load_rubric_from_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nscale: [0, 2]\ncriteria:\n  - name: clear\n    description: easy to follow\n")
    r = load_rubric(path)
    assert r == Rubric("mine", (0, 2), (Criterion("clear", "easy to follow"),))
    assert load_rubric(r) is r
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_rubric(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="neither a file nor a built-in rubric .*story"):
        load_rubric("no_such_rubric")


def test_self_rubric_reads_the_completions_own_rating():
    v = get_verifier("self_rubric", rubric="story")
    completions = [" A story.\n" + FULL,
                   " A story.\n<rating>structure: 5</rating>",          # missing criteria: 0, counted
                   " A story.\n<rating>structure: 9; descriptive: 4; person: 5; tone: 2; words: 3</rating>",
                   " A story with no rating at all"]
    scores = v(["p"] * 4, completions)
    assert scores == [pytest.approx(0.7), 0.0, 0.0, 0.0]
    assert v.stats == {"scored": 4, "unparsable": 3, "why/missing": 1, "why/out_of_range": 1, "why/no_block": 1}
    assert v.last_reasons[0] == "" and "outside the scale" in v.last_reasons[2]


def test_self_rubric_with_a_rater():
    seen = []

    def rate(asks):
        seen.extend(asks)
        return [FULL, "<rating>tone: 1</rating>"]

    v = SelfRubric("story", rate=rate)
    scores = v(["Task: T\nStory:", "Task: U\nStory:"],
               [" Once, Ada smiled.\n<rating>structure: 1; descriptive: 1; person: 1; tone: 1; words: 1</rating>",
                " Ben sat."])
    assert scores == [pytest.approx(0.7), 0.0]          # the rater's ratings, not the completion's own
    # the rater sees the prompt and the answer without the policy's own rating
    assert seen == ["Task: T\nStory: Once, Ada smiled.\n", "Task: U\nStory: Ben sat.\n"]
    assert v.stats["unparsable"] == 1 and v.stats["why/missing"] == 1

    bad = SelfRubric("story", rate=lambda asks: ["only one"])
    with pytest.raises(ValueError, match="rate must return one string per rating prompt"):
        bad(["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="rate must be a callable"):
        SelfRubric("story", rate="model")


def test_self_rubric_needs_a_rubric():
    with pytest.raises(ValueError, match="rubric: the self_rubric verifier needs a rubric"):
        get_verifier("self_rubric")


def test_answer_part_and_rating_prompt():
    assert answer_part(" story.\n<rating>x</rating>") == " story."
    assert answer_part("no rating") == "no rating"
    assert default_rating_prompt("P:", " s.") == "P: s.\n"


def test_parse_rating_scores_are_in_unit_interval():
    import itertools

    r = Rubric("r", (1, 3), (Criterion("a", "x"), Criterion("b", "y", 2.0)))
    for a, b in itertools.product(range(1, 4), repeat=2):
        s, _ = parse_rating(f"<rating>a: {a}; b: {b}</rating>", r)
        assert 0.0 <= s <= 1.0 and math.isclose(s, ((a - 1) / 2 + 2 * (b - 1) / 2) / 3)


def test_model_rater_on_the_shipped_model():
    """A rater from a causal LM: greedy continuation of each rating prompt, stopped after
    </rating>. Whatever the shipped model writes, each completion gets a score in [0, 1]
    and is counted as read or unparsable."""
    from pyvf.data.openended import Task
    from pyvf.runtime.model import load_model_and_tokenizer
    from pyvf.verify import model_rater

    model, tok = load_model_and_tokenizer("builtin")
    rate = model_rater(model, tok, max_new_tokens=6)
    asks = ["Task: a\nStory: Ada smiled.\n", "Task: b\nStory: Ben sat.\n"]
    texts = rate(asks)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    v = SelfRubric("story", rate=rate)
    prompt = Task("Ada", "coins").prompt
    scores = v([prompt, prompt], [" Ada smiled.", " Ada sat by the door."])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert v.stats["scored"] == 2 and v.stats.get("unparsable", 0) == sum(r != "" for r in v.last_reasons)
