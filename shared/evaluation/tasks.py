"""Evaluation tasks: bundled generated tasks, user JSONL tasks, and lm-eval YAML over them.

Every multiple-choice task is a JSONL file, one item a line::

    {"query": "Question: What is 2 plus 3?\\nAnswer:", "choices": ["5", "6", "4"], "gold": 0}

``query`` is the prompt (no trailing space), ``choices`` two or more non-empty strings, each
scored as the continuation ``" " + choice``, and ``gold`` the index of the right one. Other
keys (e.g. ``"id"``) are kept and ignored. The bundled tasks are generated from a seed, so the
same seed gives the same files byte for byte.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_ITEMS = 300
DEFAULT_SEED = 1234
SCHEMA_HINT = 'each line must be a JSON object {"query": str, "choices": [str, str, ...], "gold": int}'


class TaskFileError(ValueError):
    """A task file or task name that cannot be used; the message names the file, line and fix."""


# ---- bundled generators -------------------------------------------------------------------------

def _shuffle_choices(rng: random.Random, gold: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [gold] + distractors
    rng.shuffle(choices)
    return choices, choices.index(gold)


def arithmetic_items(n: int, rng: random.Random) -> list[dict]:
    """Two-operand integer arithmetic; distractors are the near misses a model would make."""
    ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    items = []
    while len(items) < n:
        word, fn = rng.choice(ops)
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if word == "times" else (rng.randint(10, 99), rng.randint(10, 99))
        answer = fn(a, b)
        near = {answer + d for d in (-10, -2, -1, 1, 2, 10)} | {fn(a + 1, b), fn(a, b - 1)}
        near.discard(answer)
        distractors = rng.sample(sorted(near), 3)
        choices, gold = _shuffle_choices(rng, str(answer), [str(d) for d in distractors])
        items.append({"query": f"Question: What is {a} {word} {b}?\nAnswer:", "choices": choices, "gold": gold})
    return items


WORDS = sorted(set("""
about above across action active actual afraid after again against animal answer appear
around arrive autumn became before begin behind believe better between beyond bottle bridge
bright broken brother build butter camera candle castle center change chapter chicken choice
circle clean clever closed cloud coffee color common corner cotton country course cousin
danger dinner doctor dollar double dream driver early earth engine enough evening family
farmer father favorite finger finish flower follow forest forget friend future garden gentle
ground guitar happen health heavy honest horse house hunter island jacket kitchen ladder
laugh letter light listen little market middle minute mirror moment money monkey morning
mother mountain music nature number object office orange paper parent pencil people pepper
picture planet pocket poetry purple question rabbit reason river rocket school season second
silver simple sister smile soldier spring square station stone story street summer sunday
table teacher thunder ticket tiger today tomato travel treasure village violin water weather
window winter wonder world yellow
""".split()))


def unscramble_items(n: int, rng: random.Random) -> list[dict]:
    """Undo a permutation of a word's letters: the word against other orders of the same letters."""
    items = []
    while len(items) < n:
        word = rng.choice(WORDS)
        letters = list(word)
        orders: set[str] = set()
        while len(orders) < 4:
            rng.shuffle(letters)
            cand = "".join(letters)
            if cand != word:
                orders.add(cand)
        scrambled, *distractors = sorted(orders)
        rng.shuffle(distractors)
        choices, gold = _shuffle_choices(rng, word, distractors)
        query = f"The letters of an English word were shuffled into \"{scrambled}\". The original word is"
        items.append({"query": query, "choices": choices, "gold": gold})
    return items


def _fmt_date(d: _dt.date) -> str:
    return f"{d.strftime('%B')} {d.day}, {d.year}"


def _shift_month(d: _dt.date, months: int) -> _dt.date:
    y, m = divmod(d.month - 1 + months, 12)
    return d.replace(year=d.year + y, month=m + 1, day=min(d.day, 28))


def date_items(n: int, rng: random.Random) -> list[dict]:
    """Date arithmetic from templates; distractors are off by a day, a month, a year or the sign."""
    templates = [
        (1, "What is the date tomorrow?"), (-1, "What was the date yesterday?"),
        (7, "What is the date one week from today?"), (-7, "What was the date one week ago?"),
        (2, "What is the date the day after tomorrow?"), (-2, "What was the date the day before yesterday?"),
        (None, "What is the date {k} days from today?"), (None, "What was the date {k} days ago?"),
    ]
    start = _dt.date(1990, 1, 1)
    items = []
    while len(items) < n:
        today = start + _dt.timedelta(days=rng.randint(0, 365 * 40))
        delta, question = rng.choice(templates)
        if delta is None:
            k = rng.randint(3, 30)
            delta = k if "from today" in question else -k
            question = question.format(k=k)
        answer = today + _dt.timedelta(days=delta)
        wrong = {answer + _dt.timedelta(days=1), answer - _dt.timedelta(days=1),
                 today - _dt.timedelta(days=delta), _shift_month(answer, 1), _shift_month(answer, -1),
                 answer.replace(year=answer.year + 1) if not (answer.month == 2 and answer.day == 29)
                 else answer + _dt.timedelta(days=366)}
        wrong.discard(answer)
        distractors = [_fmt_date(d) for d in rng.sample(sorted(wrong), 3)]
        choices, gold = _shuffle_choices(rng, _fmt_date(answer), distractors)
        query = f"Today is {today.strftime('%A')}, {_fmt_date(today)}. {question}\nAnswer:"
        items.append({"query": query, "choices": choices, "gold": gold})
    return items


_WORD = re.compile(r"^[a-z]{4,}$")


def english_sentences() -> tuple[list[str], str]:
    """Prose sentences of Python's own reference manual, which ships with every CPython
    (``pydoc_data.topics``); returns (sentences, description of the source)."""
    from pydoc_data.topics import topics

    sentences = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if any(ln.startswith(" ") for ln in lines) or any(set(ln) <= set("*=-") for ln in lines if ln):
                continue  # code blocks and headings
            text = " ".join(ln.strip() for ln in lines)
            for s in re.split(r"(?<=[.!?])\s+", text):
                words = s.split()
                if 8 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and '"' not in s and "*" not in s:
                    sentences.append(" ".join(words))
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]
    source = f"pydoc_data.topics of Python {sys.version_info.major}.{sys.version_info.minor} ({len(sentences)} sentences, sha256 {digest})"
    return sentences, source


def cloze_items(n: int, rng: random.Random) -> list[dict]:
    """Next word of a real English sentence against three words drawn from the same text."""
    sentences, _ = english_sentences()
    if not sentences:
        raise RuntimeError("no English sentences found in pydoc_data.topics; the cloze task cannot be built")
    pool = sorted({w.rstrip(".,;:") for s in sentences for w in s.split() if _WORD.match(w.rstrip(".,;:"))})
    order = list(range(len(sentences)))
    rng.shuffle(order)
    items = []
    for i in itertools.cycle(order):
        if len(items) >= n:
            break
        words = sentences[i].split()
        spots = [j for j in range(5, len(words)) if _WORD.match(words[j].rstrip(".,;:"))]
        if not spots:
            continue
        j = rng.choice(spots)
        gold_word = words[j].rstrip(".,;:")
        distractors = rng.sample([w for w in pool if w != gold_word], 3)
        choices, gold = _shuffle_choices(rng, gold_word, distractors)
        items.append({"query": " ".join(words[:j]), "choices": choices, "gold": gold})
    return items


@dataclass(frozen=True)
class BundledTask:
    name: str
    make: Callable[[int, random.Random], list[dict]]
    description: str


BUNDLED: dict[str, BundledTask] = {t.name: t for t in [
    BundledTask("arithmetic_mc", arithmetic_items, "two-operand integer arithmetic, 4 choices"),
    BundledTask("unscramble_mc", unscramble_items, "undo a permutation of a word's letters, 4 choices"),
    BundledTask("dates_mc", date_items, "date arithmetic from templates, 4 choices"),
    BundledTask("cloze_mc", cloze_items, "next word of sentences of Python's reference manual, 4 choices"),
]}


def bundled_items(name: str, n: int = DEFAULT_ITEMS, seed: int = DEFAULT_SEED) -> list[dict]:
    # one stream per task, so adding a task never changes another's items
    rng = random.Random(f"{seed}:{name}")
    return BUNDLED[name].make(n, rng)


# ---- JSONL validation and YAML ------------------------------------------------------------------

def validate_item(obj: object) -> str | None:
    """The problem with one parsed item, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("query", "choices", "gold") if k not in obj]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(obj["query"], str) or not obj["query"].strip():
        return '"query" must be a non-empty string'
    ch = obj["choices"]
    if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
        return '"choices" must be a list of at least two non-empty strings'
    if len(set(ch)) != len(ch):
        return '"choices" must be distinct'
    g = obj["gold"]
    if isinstance(g, bool) or not isinstance(g, int):
        return f'"gold" must be an integer index into "choices", got {g!r}'
    if not 0 <= g < len(ch):
        return f'"gold" {g} is out of range for {len(ch)} choices (valid: 0..{len(ch) - 1})'
    return None


def read_task_file(path: str | Path) -> list[dict]:
    """Parse and check a JSONL task file; raises TaskFileError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist; pass a path to a JSONL file ({SCHEMA_HINT})")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); {SCHEMA_HINT}") from None
            problem = validate_item(obj)
            if problem:
                raise TaskFileError(f"{path}, line {n}: {problem}; {SCHEMA_HINT}")
            items.append(obj)
    if not items:
        raise TaskFileError(f"{path} holds no items; {SCHEMA_HINT}")
    return items


def write_jsonl(items: Iterable[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items), encoding="utf-8")
    tmp.replace(path)


def task_yaml(name: str, jsonl: Path) -> str:
    """An lm-eval multiple-choice task over a local JSONL file (lm-eval wants an absolute path)."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(Path(jsonl).resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: query",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: " "',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ])


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class TaskSet:
    """The tasks of one evaluation, ready for an lm-eval ``TaskManager``."""
    names: list[str]
    task_dir: Path
    include_paths: list[Path] = field(default_factory=list)
    items: dict[str, list[dict]] = field(default_factory=dict)  # JSONL tasks' items (greedy probe)
    sources: dict[str, str] = field(default_factory=dict)

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        paths = [str(self.task_dir)] + [str(p) for p in self.include_paths]
        return TaskManager(include_path=paths, include_defaults=False)


def prepare_tasks(specs: Iterable[str], work_dir: str | Path, *, items: int = DEFAULT_ITEMS, seed: int = DEFAULT_SEED,
                  include_paths: Iterable[str | Path] = ()) -> TaskSet:
    """Resolve task specs into lm-eval task configs under ``work_dir``.

    A spec is a bundled task name (``all`` = every bundled task), a path to a JSONL file
    (task name = file stem; ``NAME=PATH`` to choose it), or the name of a YAML task found in
    ``include_paths``. Every spec is checked before anything is written.
    """
    work = Path(work_dir)
    includes = [Path(p).resolve() for p in include_paths]
    for p in includes:
        if not p.is_dir():
            raise TaskFileError(f"include path {p} is not a directory of lm-eval task YAML files")
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise TaskFileError(f"no tasks given; choose from {', '.join(BUNDLED)}, 'all', or JSONL files")
    ts = TaskSet([], work, includes)
    jsonl_tasks: dict[str, tuple[list[dict], Path | None]] = {}  # None: write the bundled items
    for spec in itertools.chain.from_iterable(BUNDLED if s == "all" else [s] for s in specs):
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        if spec in BUNDLED:
            name = spec
            its, file = bundled_items(spec, items, seed), None
            src = BUNDLED[spec].description + (f"; text: {english_sentences()[1]}" if spec == "cloze_mc" else "")
            ts.sources[name] = f"bundled ({src}; seed {seed})"
        elif path.endswith(".jsonl") or "/" in path or Path(path).is_file():
            file = Path(path).resolve()
            name = name or file.stem
            if not _NAME.match(name):
                raise TaskFileError(f"task name {name!r} (from {path}) may only use letters, digits, '_', '.', '-'; "
                                    "pass NAME=PATH to choose one")
            if name in BUNDLED:
                raise TaskFileError(f"task file {path} would be named {name!r}, which is a bundled task; pass NAME=PATH")
            its = read_task_file(path)
            ts.sources[name] = f"file {file}"
        elif includes:
            name, its = spec, None
            ts.sources[name] = "include path"
        else:
            raise TaskFileError(f"unknown task {spec!r}: not a bundled task ({', '.join(BUNDLED)}), not an existing "
                                "JSONL file, and no --include-path was given for YAML tasks")
        if name in ts.names:
            raise TaskFileError(f"task {name!r} is given twice; rename one of the files (NAME=PATH)")
        ts.names.append(name)
        if its is not None:
            jsonl_tasks[name] = (its, file)
    work.mkdir(parents=True, exist_ok=True)
    for name, (its, file) in jsonl_tasks.items():
        if file is None:
            file = work / f"{name}.jsonl"
            write_jsonl(its, file)
        (work / f"{name}.yaml").write_text(task_yaml(name, file))
        ts.items[name] = its
    return ts
