"""Task data: real files from the offline packages, splits that never overlap, JSONL checks."""

import json

import pytest

from stablelora.eval.math import extract_final_number, same_number
from stablelora.assets.tasks import TASKS, eval_set_names, example_key, load_jsonl_task, load_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_named_task_splits_are_disjoint_and_deterministic(name):
    task = load_task(name, eval_size=50, seed=3)
    assert task.train and task.eval and task.split_note
    assert (task.name, *task.extra_eval) == eval_set_names(name, None)  # what compare checks a metric against
    train_keys = {example_key(x) for x in task.train}
    for examples in [task.eval, *task.extra_eval.values()]:
        assert not train_keys & {example_key(x) for x in examples}
    again = load_task(name, eval_size=50, seed=3)
    assert [example_key(x) for x in again.eval] == [example_key(x) for x in task.eval]
    if task.family == "multiple_choice":
        assert all(0 <= x["label"] < len(x["choices"]) for x in task.train + task.eval)


def test_gsm_symbolic_eval_templates_are_held_out():
    task = load_task("gsm-symbolic", eval_size=50, seed=0)
    assert len(task.eval) == 50 and "asdiv" in task.extra_eval
    assert not {x["template"] for x in task.train} & {x["template"] for x in task.eval}
    assert all(same_number(extract_final_number(x["completion"]), x["answer"]) for x in task.train[:50])


def test_gsm_symbolic_validation_templates_are_seen_neither_in_training_nor_in_eval(tmp_path):
    from stablelora.train.config import load_config
    from stablelora.train.data import load_task_data

    task = load_task_data(load_config(None, ["data.dataset=gsm-symbolic", "data.eval_size=60",
                                             "data.validation_size=40"], output_dir=str(tmp_path)))
    train, validation, evaluation = ({x["template"] for x in part} for part in (task.train, task.validation, task.eval))
    assert len(task.validation) == 40 and len(validation) >= 4 and len(evaluation) >= 10
    assert not train & validation and not validation & evaluation and not train & evaluation


def test_validation_holds_out_whole_templates_when_examples_carry_them(tmp_path):
    """Tuning on problems from training templates rewards memorising them; validation must generalise like eval."""
    from stablelora.train.config import load_config
    from stablelora.train.data import load_task_data
    from stablelora.train.errors import RunError

    rows = [{"prompt": f"p{t}-{i}", "completion": f"c{t}-{i}", "template": t} for i in range(5) for t in range(16)]
    rows += [{"prompt": "e", "completion": "e", "template": 99}]
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows[:-1]))
    evaluation.write_text(json.dumps(rows[-1]))

    def task_for(size):
        return load_task_data(load_config(None, ["data.dataset=jsonl", f"data.train_file={train}",
                                                 f"data.eval_file={evaluation}", "data.format=generation",
                                                 f"data.validation_size={size}"], output_dir=str(tmp_path)))

    task = task_for(6)
    held = {x["template"] for x in task.validation}
    assert len(task.validation) == 6 and held == {0, 1}  # 16 // 8 templates, the first seen, ~evenly drawn
    assert not held & {x["template"] for x in task.train} and len(task.train) == 70
    assert "6 examples from 2 of the 16 training templates" in task.split_note
    with pytest.raises(RunError, match="needs more than the 10 examples of the 2 of 16 .* Lower it to 10 or less"):
        task_for(11)
    train.write_text("\n".join(json.dumps(r) for r in rows[:-1] if r["template"] == 3))
    with pytest.raises(RunError, match="come from 1 template, and validation holds out whole templates"):
        task_for(2)


def test_unknown_dataset_and_oversized_eval():
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        load_task("nope", eval_size=10, seed=0)
    with pytest.raises(ValueError, match="leaves no training data"):
        load_task("openbookqa", eval_size=10_000, seed=0)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_task_formats_and_errors(tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"question": "q1", "choices": ["a", "b"], "label": 1}])
    evaluation = _jsonl(tmp_path / "e.jsonl", [{"question": "q2", "choices": ["a", "b"], "label": 0}])
    task = load_jsonl_task(train, evaluation, "multiple_choice")
    assert task.family == "multiple_choice" and task.train[0]["context"] == ""
    with pytest.raises(ValueError, match="appear in both"):
        load_jsonl_task(train, train, "multiple_choice")
    bad = _jsonl(tmp_path / "b.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"b.jsonl:1: missing field\(s\) \['choices', 'label'\]"):
        load_jsonl_task(bad, evaluation, "multiple_choice")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl_task(str(tmp_path / "none.jsonl"), evaluation, "classification")
    with pytest.raises(ValueError, match="data.format must be one of"):
        load_jsonl_task(train, evaluation, "regression")


def test_validation_is_carved_from_train_and_the_eval_split_ignores_the_training_seed(tmp_path):
    from stablelora.train.config import load_config
    from stablelora.train.data import load_task_data
    from stablelora.train.errors import RunError

    def task_for(*overrides):
        cfg = load_config(None, ["data.dataset=openbookqa", "data.eval_size=50", *overrides],
                          output_dir=str(tmp_path))
        return load_task_data(cfg)

    task = task_for("data.validation_size=30")
    keys = [{example_key(x) for x in part} for part in (task.train, task.validation, task.eval)]
    assert len(task.validation) == 30 and not keys[0] & keys[1] and not keys[1] & keys[2] and not keys[0] & keys[2]
    other_seed = task_for("data.validation_size=30", "training.seed=7")
    assert [example_key(x) for x in other_seed.eval] == [example_key(x) for x in task.eval]
    assert "Validation: the first 30" in task.split_note
    with pytest.raises(RunError, match="leaves no training data"):
        task_for("data.validation_size=10000")
    with pytest.raises(RunError, match="applies to generation \\(math\\) tasks only; task 'openbookqa'"):
        task_for("data.generate=false")


@pytest.mark.parametrize("family, rows, message", [
    ("multiple_choice", [{"question": "q", "choices": ["a", "b"], "label": 2}], r"b.jsonl:1: 'label' 2 is out of range"),
    ("multiple_choice", [{"question": "q", "choices": ["a", "b"], "label": "a"}], "'label' must be an integer"),
    ("multiple_choice", [{"question": "q", "choices": "ab", "label": 0}], "'choices' must be a list"),
    ("classification", [{"text": "x", "label": 1.5}], "'label' must be an integer"),
    ("classification", [{"text": "x", "label": 0}, {"text": "y", "label": 1}, {"text": "z", "label": 5}],
     r"labels must be 0 to K-1 with every class present; found \[0, 1, 5\]"),
    ("generation", [{"prompt": 3, "completion": "4"}], r"\['prompt'\] must be text"),
    ("classification", [{"text": "x", "text_pair": 7, "label": 0}], r"b.jsonl:1: \['text_pair'\] must be text"),
    ("multiple_choice", [{"question": "q", "choices": ["a", "b"], "label": 0},
                         {"question": "r", "choices": ["a", "b", "c"], "label": 0}],
     "b.jsonl:2: 3 choices, but line 1 has 2; every question of a multiple-choice file needs the same number"),
])
def test_jsonl_rows_with_bad_labels_or_types_are_refused_with_their_line(tmp_path, family, rows, message):
    good = {"multiple_choice": {"question": "e", "choices": ["a", "b"], "label": 0},
            "classification": {"text": "e", "label": 0}, "generation": {"prompt": "e", "completion": "1"}}[family]
    bad = _jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_jsonl_task(bad, _jsonl(tmp_path / "e.jsonl", [good]), family)


def test_jsonl_eval_label_never_seen_in_training_is_refused(tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    evaluation = _jsonl(tmp_path / "e.jsonl", [{"text": "c", "label": 2}])
    with pytest.raises(ValueError, match=r"label\(s\) \[2\] never occur in"):
        load_jsonl_task(train, evaluation, "classification")
