"""The built-in open-ended task: short stories rated against a rubric, with no reference
answer (docs/algorithms.md: Self-rated rubric). Small enough for the shipped tiny model.

A prompt asks for a story about a name and some items; the completion is the story,
a new line, and the model's own rating of it in the rubric's format
(pyvf/data/rubrics/story.yaml, parsed by pyvf.verify.rubric):

    Task: Write a short story about Ada and the marbles.
    Write the story, then rate it.
    Story: Once, Ada had 3 marbles. Then the marbles rolled away. In the end, Ada found them.
    <rating>structure: 5; descriptive: 5; person: 5; tone: 3; words: 5</rating>

Everything is generated from a seed, so splits are reproducible. `write_story` draws
stories of varying quality from a small grammar (a beginning, middle and end or not,
descriptive or directive sentences, "you", forbidding words, long rare words), and
`true_rating` applies the rubric's criteria by rule; the warm-up of the shipped model
(`warmup_pairs`) pairs each story with its true rating, and evaluation compares a
model's self-rating with the true one.

The rules of `true_rating` (sentences end at . ! or ?; words are runs of letters and
apostrophes, compared in lower case; a rating block, if any, is cut off first):
- structure: 1 + the number of parts present (a sentence starting "Once", "One
  morning" or "Long ago" begins; "Then", "Suddenly", "One day" or "But" is a
  middle; "In the end", "At last" or "Finally" ends), + 1 when all three are present
  and their first sentences come in that order. 1..5.
- descriptive: directive sentences start with an imperative (Look, Take, Never, Don't,
  ...); every other sentence is descriptive. No directive: 5 (1 for an empty story);
  else by descriptive / directive: >= 2: 5, >= 1.5: 4, >= 1: 3, >= 0.5: 2, below: 1.
- person: 5 - (number of second-person words: you, your, yours, yourself, you're, ...),
  at least 1.
- tone: 3 + min(encouraging words, 2) - 2 * forbidding words, clipped to 1..5.
  Forbidding: never, don't, can't, cannot, mustn't, forbidden, and the phrases "must
  not", "do not", "not allowed". Encouraging: brave, kind, together, proud, help,
  helped, hope, try.
- words: 5 - (number of words of 10 letters or more), at least 1.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pyvf.data.example import Example
from pyvf.data.rubric import OPEN, load_rubric

# The synthetic task's names and items: the shipped tokenizer already has them as tokens.
from pyvf.data.synthetic import ITEMS, NAMES

QUESTION_TEMPLATE = "Write a short story about {name} and the {items}."
PROMPT_TEMPLATE = "Task: {question}\nWrite the story, then rate it.\nStory:"
RUBRIC = "story"                   # the built-in rubric: pyvf/data/rubrics/story.yaml

# Fixed splits, as for the synthetic task: training and held-out prompts from different seeds.
TRAIN_SEED = 1
EVAL_SEED = 2


# --- the grammar ---------------------------------------------------------------------------
# Each pool is one kind of sentence; {name}, {items} and {n} are filled from the task.
_BEGIN = ["Once, {name} had {n} {items}.", "One morning, {name} found {items}.", "Long ago, {name} kept {items}."]
_MIDDLE = ["Then the {items} rolled away.", "Suddenly, a dog took the {items}.", "One day, the {items} broke.",
           "But the {items} were lost."]
_END = ["In the end, {name} found them.", "At last, {name} fixed it.", "Finally, {name} shared them."]
_FILLERS = {   # kind of sentence -> (pool, how often it is drawn)
    "descriptive": (["The {items} were bright.", "The sun was warm.", "{name} smiled.", "The garden was quiet.",
                     "{name} sat by the door."], 0.3),
    "encouraging": (["{name} was brave and kind.", "They felt proud.", "A friend came to help.", "{name} had hope."],
                    0.15),
    "directive": (["Look at the {items}.", "Take the {items} home.", "Keep the {items} safe.", "Count the {items}."],
                  0.25),
    "forbidding": (["Never lose the {items}.", "Don't touch the {items}.", "{name} must not lose them."], 0.1),
    "second_person": (["You would like the {items}.", "Your friends were there.", "You saw {name} too."], 0.1),
    "rare": (["The {items} looked extraordinary.", "{name} felt melancholic.", "The neighbourhood was picturesque."],
             0.1),
}

# --- the rules -------------------------------------------------------------------------------
_BEGIN_CUES = ("once", "one morning", "long ago")
_MIDDLE_CUES = ("then", "suddenly", "one day", "but")
_END_CUES = ("in the end", "at last", "finally")
_IMPERATIVES = frozenset({"look", "take", "keep", "count", "go", "come", "put", "give", "remember", "be", "do",
                          "don't", "never", "always", "stop", "listen", "share", "try", "let", "make", "bring"})
_SECOND_PERSON_WORDS = frozenset({"you", "your", "yours", "yourself", "yourselves", "you're", "you'll", "you've",
                                  "you'd"})
_FORBIDDING_WORDS = frozenset({"never", "don't", "can't", "cannot", "mustn't", "forbidden"})
_FORBIDDING_PHRASES = (("must", "not"), ("do", "not"), ("not", "allowed"))
_ENCOURAGING_WORDS = frozenset({"brave", "kind", "together", "proud", "help", "helped", "hope", "try"})
LONG_WORD = 10                     # letters; a word this long counts against "words"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z']+")


@dataclass(frozen=True)
class Task:
    name: str
    items: str

    @property
    def question(self) -> str:
        return QUESTION_TEMPLATE.format(name=self.name, items=self.items)

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question)


def generate_tasks(n: int, seed: int = 0) -> list[Task]:
    """n story prompts, reproducible from `seed`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [Task(rng.choice(NAMES), rng.choice(ITEMS)) for _ in range(n)]


def write_story(task: Task, rng: random.Random) -> str:
    """A story for `task` of random quality: 2 to 5 sentences; each part of the
    structure there or not; the rest drawn from descriptive, encouraging, directive,
    forbidding, second-person and rare-word sentences; now and then the whole story out
    of order."""
    fill = dict(name=task.name, items=task.items, n=rng.randint(2, 9))
    length = rng.choice([2, 3, 4, 4, 5, 5])
    begin = [rng.choice(_BEGIN)] if rng.random() < 0.75 else []
    middle = [rng.choice(_MIDDLE)] if rng.random() < 0.7 else []
    end = [rng.choice(_END)] if rng.random() < 0.7 else []
    room = max(0, length - len(begin) - len(middle) - len(end))
    kinds = list(_FILLERS)
    body: list[str] = []
    for kind in rng.choices(kinds, weights=[_FILLERS[k][1] for k in kinds], k=room):
        unused = [x for x in _FILLERS[kind][0] if x not in body]
        if unused:
            body.append(rng.choice(unused))
    if middle:
        body.insert(rng.randint(0, len(body)), middle[0])
    parts = begin + body + end
    if len(parts) < 2:
        parts += [x for x in _FILLERS["descriptive"][0] if x not in parts][:2 - len(parts)]
    if not any("{name}" in x or "{items}" in x for x in parts):
        parts.append("{name} smiled.")  # every story is about its prompt
    if rng.random() < 0.15:
        rng.shuffle(parts)
    return " ".join(p.format(**fill) for p in parts)


def story_part(text: str) -> str:
    """`text` without a rating block: everything before the first `<rating>`."""
    pos = text.find(OPEN)
    return (text if pos < 0 else text[:pos]).strip()


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(story_part(text)) if s.strip()]


def _words(sentence: str) -> list[str]:
    return _WORD.findall(sentence.lower().replace("\u2019", "'"))


def _starts_with(sentence: str, cues) -> bool:
    words = _words(sentence)
    return any(words[:len(cue.split())] == cue.split() for cue in cues)


def true_rating(text: str) -> dict[str, int]:
    """The story's rating on each criterion of the built-in rubric, by the rules in the
    module docstring (a rating block in `text` is ignored)."""
    sents = sentences(text)
    words = [w for s in sents for w in _words(s)]

    first = {}
    for i, s in enumerate(sents):
        for part, cues in (("begin", _BEGIN_CUES), ("middle", _MIDDLE_CUES), ("end", _END_CUES)):
            if part not in first and _starts_with(s, cues):
                first[part] = i
    structure = 1 + len(first)
    if len(first) == 3 and first["begin"] < first["middle"] < first["end"]:
        structure += 1

    directive = sum(1 for s in sents if _words(s)[:1] and _words(s)[0] in _IMPERATIVES)
    descriptive = len(sents) - directive
    if directive == 0:
        desc = 5 if descriptive else 1
    else:
        ratio = descriptive / directive
        desc = 5 if ratio >= 2 else 4 if ratio >= 1.5 else 3 if ratio >= 1 else 2 if ratio >= 0.5 else 1

    person = max(1, 5 - sum(w in _SECOND_PERSON_WORDS for w in words))

    forbidding = sum(w in _FORBIDDING_WORDS for w in words)
    for s in sents:
        ws = _words(s)
        forbidding += sum(tuple(ws[i:i + 2]) in _FORBIDDING_PHRASES for i in range(len(ws) - 1))
    encouraging = sum(w in _ENCOURAGING_WORDS for w in words)
    tone = min(5, max(1, 3 + min(encouraging, 2) - 2 * forbidding))

    long_words = sum(len(w.replace("'", "")) >= LONG_WORD for w in words)
    return {"structure": structure, "descriptive": desc, "person": person, "tone": tone,
            "words": max(1, 5 - long_words)}


def _rubric():
    return load_rubric(RUBRIC)


def true_score(text: str) -> float:
    """The true rating as a score in [0, 1] (the rubric's weighted mean), for evaluation."""
    return _rubric().score(true_rating(text))


def rating_block(text: str) -> str:
    """The rating block the story deserves, in the rubric's format."""
    return _rubric().render(true_rating(text))


def completion_text(story: str) -> str:
    """What the policy writes: the story, a new line, its (true) rating block."""
    return f" {story}\n{rating_block(story)}"


def examples(n: int, seed: int) -> list[Example]:
    """n `Example`s with no reference answer (answers and weights empty)."""
    return [Example(t.question, (), ()) for t in generate_tasks(n, seed=seed)]


def warmup_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs for supervised warm-up: a story of random quality
    and its true rating, so a model learns to write stories and to rate them."""
    rng = random.Random(seed)
    tasks = generate_tasks(n, seed=rng.randrange(2**31))
    return [(t.prompt, completion_text(write_story(t, rng))) for t in tasks]


__all__ = ["EVAL_SEED", "PROMPT_TEMPLATE", "QUESTION_TEMPLATE", "RUBRIC", "TRAIN_SEED", "Task", "completion_text",
           "examples", "generate_tasks", "rating_block", "sentences", "story_part", "true_rating", "true_score",
           "warmup_pairs", "write_story"]
