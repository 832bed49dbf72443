"""The open-ended story task: reproducible generation, the rule-based true rating on
planted stories, and warm-up pairs in the rubric's format that fit the tiny model."""

import pytest

from pyvf.data import openended as oe
from pyvf.verify import load_rubric, parse_rating, read_ratings

RUBRIC = load_rubric(oe.RUBRIC)


def test_generation_is_reproducible():
    assert oe.generate_tasks(20, seed=3) == oe.generate_tasks(20, seed=3)
    assert oe.generate_tasks(20, seed=3) != oe.generate_tasks(20, seed=4)
    assert oe.warmup_pairs(30, seed=5) == oe.warmup_pairs(30, seed=5)
    assert oe.warmup_pairs(30, seed=5) != oe.warmup_pairs(30, seed=6)
    with pytest.raises(ValueError, match="n must be >= 0"):
        oe.generate_tasks(-1)


def test_task_prompt():
    task = oe.Task("Ada", "marbles")
    assert task.question == "Write a short story about Ada and the marbles."
    assert task.prompt == "Task: Write a short story about Ada and the marbles.\nWrite the story, then rate it.\nStory:"


@pytest.mark.parametrize("story, want", [
    # complete, in order, all descriptive, neutral tone, plain words
    ("Once, Ada had 3 marbles. Then the marbles rolled away. In the end, Ada found them.",
     dict(structure=5, descriptive=5, person=5, tone=3, words=5)),
    # all three parts but the end comes first: 1 + 3, no order bonus
    ("In the end, Ada found them. Once, Ada had 3 marbles. Then the marbles rolled away.",
     dict(structure=4, descriptive=5, person=5, tone=3, words=5)),
    # beginning only; 2 descriptive vs 2 directive (ratio 1: 3); "Never" forbids (3 - 2);
    ("Long ago, Ben kept coins. Look at the coins. Never lose the coins. The sun was warm.",
     dict(structure=2, descriptive=3, person=5, tone=1, words=5)),
    # no structure; 3 descriptive vs 1 directive (ratio 3: 5); "you" twice, "your" once;
    # brave + kind + together caps at +2; one 10+ letter word ("extraordinary")
    (("You saw Ben. Your friends were brave and kind. Take the coins. They worked together and you "
      "felt extraordinary."),
     dict(structure=1, descriptive=5, person=2, tone=5, words=4)),
    # middle only ("But"); 1 descriptive vs 3 directive (ratio 1/3: 1); "don't" and "must not": 3 + 1 - 4;
    # "neighbourhood" and "picturesque" are long
    ("Don't touch it. Count the cards. Keep the cards. But Pia must not help the picturesque neighbourhood.",
     dict(structure=2, descriptive=1, person=5, tone=1, words=3)),
    # 3 descriptive vs 2 directive: ratio 1.5 -> 4; a rating block after the story is ignored
    (("The sun was warm. Go home. Ada smiled. Look up. Ben sat.\n<rating>structure: 5; descriptive: 5; "
      "person: 5; tone: 5; words: 5</rating>"),
     dict(structure=1, descriptive=4, person=5, tone=3, words=5)),
    ("", dict(structure=1, descriptive=1, person=5, tone=3, words=5)),
])
def test_true_rating_of_planted_stories(story, want):
    assert oe.true_rating(story) == want


def test_true_score_and_rating_block():
    story = "Once, Ada had 3 marbles. Then the marbles rolled away. In the end, Ada found them."
    assert oe.true_score(story) == pytest.approx((4 + 4 + 4 + 2 + 4) / 20)
    assert oe.rating_block(story) == "<rating>structure: 5; descriptive: 5; person: 5; tone: 3; words: 5</rating>"
    assert oe.completion_text(story) == " " + story + "\n" + oe.rating_block(story)


def test_warmup_pairs_carry_the_true_rating_in_the_rubric_format():
    pairs = oe.warmup_pairs(200, seed=0)
    seen = {name: set() for name in RUBRIC.names}
    for prompt, completion in pairs:
        assert prompt.startswith("Task: Write a short story about ") and prompt.endswith("Story:")
        assert completion.startswith(" ") and completion.count("<rating>") == 1
        ratings, why = read_ratings(completion, RUBRIC)
        assert why == "" and ratings == oe.true_rating(completion)
        assert parse_rating(completion, RUBRIC)[0] == pytest.approx(oe.true_score(completion))
        about = prompt.split("about ")[1].split("\n")[0]          # "Ada and the marbles."
        name, items = about.split(" and the ")
        assert name in completion or items.rstrip(".") in completion  # every story is about its prompt
        for name, value in ratings.items():
            seen[name].add(value)
    # stories of varying quality: every criterion takes at least three different values
    assert all(len(values) >= 3 for values in seen.values()), seen


def test_stories_fit_the_tiny_model():
    from pyvf.assets import load_tokenizer

    tok = load_tokenizer()
    pairs = oe.warmup_pairs(300, seed=1)
    story_lengths = sorted(len(tok(oe.story_part(c))["input_ids"]) for _, c in pairs)
    total = max(len(tok(p + c)["input_ids"]) for p, c in pairs)
    assert story_lengths[len(story_lengths) // 2] <= 60, story_lengths  # median, with the shipped tokenizer
    assert total + 1 <= 256  # prompt + story + rating + EOS: half the model's 512 positions


def test_examples_have_no_reference():
    exs = oe.examples(5, seed=oe.TRAIN_SEED)
    assert [e.question for e in exs] == [t.question for t in oe.generate_tasks(5, seed=oe.TRAIN_SEED)]
    assert all(e.answers == () and e.weights == () for e in exs)
    assert oe.examples(5, seed=oe.EVAL_SEED) != exs


def test_sentences_and_story_part():
    assert oe.sentences("A b. C d! E f? G") == ["A b.", "C d!", "E f?", "G"]
    assert oe.story_part(" Tale.\n<rating>x</rating>") == "Tale."
