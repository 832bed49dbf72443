"""Question/answer data from the files people have: JSONL, JSON, Parquet, CSV and
`datasets` directories (`save_to_disk`); Parquet, CSV and directories are read with the
`datasets` library (the `data` extra).

Columns are found by name unless given (`DataKeys`, dotted paths into nested values):
verl's rows (`prompt` as a list of chat messages, the reference under
`reward_model.ground_truth`) and TRL's (`prompt` as a string or messages, `solution` or
`answer`) need no flags. A chat-message prompt is kept as messages, for the model's chat
template to render as given. Multiple-choice rows (`options` or `choices`, and the
answer as a letter, an index or the option's text) become the question with its lettered
options and the letter as the reference. A category column (`category`, `subject`,
`data_source`, `domain`) is kept for evaluation's per-category accuracy. A reference that
is a worked solution becomes its final answer: what follows GSM8K's "#### ", or the last
\\boxed{} (MATH, open-r1). Rows that give no usable question or reference are skipped and
counted.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pyvf.data.answers import last_boxed
from pyvf.data.example import Example

log = logging.getLogger("pyvf")

QUESTION_KEYS = ("question", "problem", "prompt", "query", "input")
ANSWER_KEYS = ("reward_model.ground_truth", "answer", "solution", "ground_truth", "reference", "target", "label")
OPTION_KEYS = ("options", "choices")
CATEGORY_KEYS = ("category", "subject", "data_source", "domain")


@dataclass
class DataKeys:
    """Where a row keeps its parts; "" finds them by name (QUESTION_KEYS, ANSWER_KEYS)."""
    question: str = ""
    answer: str = ""
    weights: str = ""
    split: str = ""  # of a `datasets` directory holding several splits ("": train, or its only one)
    category: str = ""  # evaluation's per-category breakdown ("": CATEGORY_KEYS when present)


def _datasets(what: str):
    """The `datasets` library (an extra: pip install "pyvf[data]")."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"data: reading {what} needs the datasets library: pip install \"pyvf[data]\" ({err})") from None
    return datasets


def read_rows(path: str | Path, split: str = "") -> tuple[list, str]:
    """(rows, the reader's name) of a data file or a `save_to_disk` directory. JSON lines
    and JSON are read row by row with Python's json (a row's answer may be a string and
    the next one's a list, which Arrow's typed columns refuse; a line that does not parse
    is a bad row, None); Parquet, CSV and directories with the `datasets` library."""
    path = Path(path)
    if path.is_dir():
        datasets = _datasets(f"the directory {path}")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded)
            chosen = split or ("train" if "train" in loaded else (names[0] if len(names) == 1 else ""))
            if chosen not in loaded:
                raise ValueError(f"data: {path} holds the splits {', '.join(names)}: choose one with --split")
            return loaded[chosen].to_list(), f"datasets directory (split {chosen})"
        return loaded.to_list(), "datasets directory"
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open() as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        rows.append(None)
        return rows, "json lines"
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...], ...}
            lists = {k: v for k, v in data.items() if isinstance(v, list)}
            key = split or ("train" if "train" in lists else (next(iter(lists)) if len(lists) == 1 else ""))
            if key not in lists:
                raise ValueError(f"data: {path.name} holds the lists {', '.join(lists) or '(none)'}: choose one with "
                                 f"--split")
            data = lists[key]
        if not isinstance(data, list):
            raise ValueError(f"data: {path.name} must hold a list of rows")
        return data, "json"
    if suffix in (".parquet", ".csv"):
        datasets = _datasets(f"{suffix} files")
        datasets.disable_progress_bars()
        reader = suffix[1:]
        table = datasets.load_dataset(reader, data_files=str(path), split=split or "train", keep_in_memory=True)
        return table.to_list(), reader
    raise ValueError(f"data: {path.name} is not a file pyvf reads: .jsonl, .json, .parquet, .csv or a `datasets` "
                     f"directory")


def _get(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _has(row: dict, dotted: str) -> bool:
    try:
        _get(row, dotted)
        return True
    except KeyError:
        return False


def _columns(row: dict, prefix: str = "") -> list[str]:
    """Every dotted path of a row, nested ones included."""
    out = []
    for key, value in row.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out += _columns(value, prefix + key + ".")
    return out


def _find(row: dict, names: tuple[str, ...], kinds: tuple[type, ...] = (object,)) -> str:
    """The first of `names` the row has (a value of one of `kinds`), spelled as the row
    spells it ("Question" for question, as GPQA does); "" when none."""
    for name in names:
        if _has(row, name) and isinstance(_get(row, name), kinds):
            return name
    by_lower = {key.lower(): key for key in row if isinstance(key, str)}
    for name in names:
        key = by_lower.get(name)
        if "." not in name and key is not None and isinstance(row[key], kinds):
            return key
    return ""


def _pick(row: dict, given: str, names: tuple[str, ...], what: str, flag: str, source: str) -> str:
    if given:
        if not _has(row, given):
            raise ValueError(f"data: {source} has no column {given!r} ({flag}); its columns: "
                             f"{', '.join(_columns(row))}")
        return given
    found = _find(row, names)
    if found:
        return found
    raise ValueError(f"data: {source} has no {what} column ({', '.join(names)}): name it with {flag}; its "
                     f"columns: {', '.join(_columns(row))}")


def _messages(value) -> tuple[tuple[str, str], ...] | None:
    if (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                  and isinstance(m.get("role"), str) for m in value)):
        return tuple((m["role"], m["content"]) for m in value)
    return None


def _answers(value) -> list[str] | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    out = [str(v).strip() if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    if not all(isinstance(v, str) and v.strip() for v in out):
        return None
    return [v.strip() for v in out]


_FINAL_LINE = re.compile(r"\n####\s*([^\n]+?)\s*$")


def final_answer(reference: str) -> str:
    """The final answer a worked solution given as the reference ends with: what follows
    GSM8K's "#### ", or the last \\boxed{...} (MATH's and open-r1's solutions); any
    other reference as it is."""
    m = _FINAL_LINE.search(reference)
    if m:
        return m.group(1)
    boxed = last_boxed(reference) if "\\boxed{" in reference else None
    return boxed.strip() if boxed and boxed.strip() else reference


def choice_letter(answer, options: list[str]) -> str | None:
    """The option letter an answer names: a letter ("B", "(B)", "b"), an index (1, "1") or
    the option's own text."""
    letters = string.ascii_uppercase[:len(options)]
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return letters[answer] if 0 <= answer < len(options) else None
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    bare = text.strip("()").strip().rstrip(".").upper()
    if len(bare) == 1 and bare in letters:
        return bare
    if text.isdigit() and int(text) < len(options):
        return letters[int(text)]
    matches = [letters[i] for i, option in enumerate(options) if option.strip() == text]
    return matches[0] if len(matches) == 1 else None


def with_options(question: str, options: list[str]) -> str:
    """The question followed by its lettered options, one per line."""
    return question.rstrip() + "\n" + "\n".join(f"{letter}. {option}" for letter, option in
                                                zip(string.ascii_uppercase, options))


def row_example(row: dict, question_key: str, answer_key: str, weights_key: str, option_key: str | None,
                weights_required: bool = False, category_key: str = "", stats: Counter | None = None
                ) -> Example | None:
    """One row as an Example, or None when it has no usable question or reference (or no
    weights where `weights_required`: an explicit --weights-key). A worked-solution
    reference becomes its final answer (`final_answer`), counted in stats["final_answer"]."""
    try:
        question = _get(row, question_key)
        answer = _get(row, answer_key)
    except KeyError:
        return None
    messages = _messages(question)
    if messages is not None:
        users = [content for role, content in messages if role == "user"]
        text = users[-1] if users else messages[-1][1]
    elif isinstance(question, str) and question.strip():
        text = question.strip()
    else:
        return None
    if option_key is not None:
        options = row.get(option_key)
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            return None
        letter = choice_letter(answer, options)
        if letter is None or len(options) > 26:
            return None
        text = with_options(text, options)
        if messages is not None:  # the options go into the last user turn
            last = max(i for i, (role, _) in enumerate(messages) if role == "user") if users else len(messages) - 1
            messages = tuple((role, with_options(content, options) if i == last else content)
                             for i, (role, content) in enumerate(messages))
        answers = [letter]
    else:
        options = []
        answers = _answers(answer)
        if answers is None:
            return None
        finals = [final_answer(a) for a in answers]
        if finals != answers and stats is not None:
            stats["final_answer"] += 1
        answers = finals
    weights = [1.0] * len(answers)
    if weights_key and _has(row, weights_key):
        weights = _get(row, weights_key)
    elif weights_key and weights_required:
        return None
    if (not isinstance(weights, list) or len(weights) != len(answers)
            or not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or sum(weights) <= 0):
        return None
    total = float(sum(weights))
    category = _get(row, category_key) if category_key and _has(row, category_key) else ""
    return Example(text, tuple(answers), tuple(float(w) / total for w in weights), messages=messages,
                   options=tuple(options), category=str(category).strip() if category is not None else "")


def load_examples(path: str | Path, keys: DataKeys | None = None) -> list[Example]:
    """The usable rows of a data file or directory as Examples; logs the reader and the
    columns used, and how many rows were skipped."""
    keys = keys or DataKeys()
    rows, reader = read_rows(path, keys.split)
    source = Path(path).name
    first = next((r for r in rows if isinstance(r, dict)), None)
    if first is None:
        raise ValueError(f"dataset {path} is empty: no row has a non-empty question and answer")
    question_key = _pick(first, keys.question, QUESTION_KEYS, "question", "--question-key", source)
    answer_key = _pick(first, keys.answer, ANSWER_KEYS, "answer", "--answer-key", source)
    weights_key = keys.weights or ("weights" if "weights" in first else "")
    if keys.weights and not _has(first, keys.weights):
        raise ValueError(f"data: {source} has no column {keys.weights!r} (--weights-key); its columns: "
                         f"{', '.join(_columns(first))}")
    option_key = _find(first, OPTION_KEYS, (list,)) or None
    if keys.category and not _has(first, keys.category):
        raise ValueError(f"data: {source} has no column {keys.category!r} (--category-key); its columns: "
                         f"{', '.join(_columns(first))}")
    category_key = keys.category or _find(first, CATEGORY_KEYS, (str, int))
    examples, bad, stats = [], 0, Counter()
    for row in rows:
        ex = (row_example(row, question_key, answer_key, weights_key, option_key, bool(keys.weights), category_key,
                          stats) if isinstance(row, dict) else None)
        if ex is None:
            bad += 1
        else:
            examples.append(ex)
    kind = "chat messages" if _messages(_get(first, question_key)) is not None else "text"
    log.info("data: %s via %s: question from %s (%s), answer from %s%s%s%s; %d rows", source, reader, question_key,
             kind, answer_key, f", options from {option_key} (the letter is the reference)" if option_key else "",
             f", weights from {weights_key}" if weights_key else "",
             f", category from {category_key}" if category_key else "", len(examples))
    if stats["final_answer"]:
        log.info("data: %d reference(s) of %s end in a final answer (after \"####\", or a last \\boxed{}): that "
                 "answer is the reference", stats["final_answer"], source)
    if bad:
        log.warning("data: skipped %d bad row(s) of %s (missing or empty question/answer, bad options or weights)",
                    bad, path)
    if not examples:
        raise ValueError(f"dataset {path} is empty: no row has a non-empty question and answer")
    return examples
