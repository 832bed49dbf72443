"""A multiple-choice data set with categories, written by the tests: the synthetic task's
questions with four numeric options (the reference among them) and the answer as a letter,
so the shipped model, which boxes a number, commits to an option."""

import json
import random

from pyvf.data import synthetic


def write_choice_file(path, n: int = 24, seed: int = 7) -> list[dict]:
    """n rows of {"question", "options", "answer" (a letter), "subject"} as JSON lines."""
    rng = random.Random(seed)
    rows = []
    for p in synthetic.generate(20 * n, seed=seed):
        if not p.answers[0].lstrip("-").isdigit():
            continue
        value = int(p.answers[0])
        options = [str(value + d) for d in (0, 1, -2, 5)]
        rng.shuffle(options)
        rows.append({"question": p.question, "options": options, "answer": "ABCD"[options.index(str(value))],
                     "subject": ("arithmetic", "sharing")[len(rows) % 2]})
        if len(rows) == n:
            break
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows
