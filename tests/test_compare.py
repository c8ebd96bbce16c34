"""The benchmark harness: config checks, aggregation maths on hand-made records, and a real 2x2 grid on a tiny
model that is killed mid-run and resumed."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stablelora.benchmark.grid import (CompareError, load_compare_config, overrides_for, plan, run_id,
                                      setting_label)
from stablelora.benchmark.aggregate import aggregate
from stablelora.benchmark.records import check_same_split, load_records, metric_key
from stablelora.benchmark.render import plot, to_markdown
from stablelora.benchmark.runner import run_grid

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "model": {"name_or_path": "smollm2-135m-instruct"},
    "data": {"dataset": "piqa", "eval_size": 8, "validation_size": 8},
    "method": {"optimizer": "adamw"},
    "training": {"max_steps": 2, "use_cpu": True},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _compare(tmp_path: Path, base: dict = BASE, **changes) -> Path:
    _write(tmp_path / "base.yaml", base)
    data = {
        "base_config": "base.yaml", "output_dir": str(tmp_path / "out"), "learning_rates": [1e-4, 1e-3],
        "tune_seeds": [0], "seeds": [0, 1, 2],
        "methods": {"adamw": {"set": {"method.optimizer": "adamw"}},
                    "stable-lora": {"set": {"method.optimizer": "stable-lora", "method.shrink_ratio": 0.002}}},
        "variants": {"no stop rule": {"of": "stable-lora", "set": {"method.stop_rule": False}, "group": "ablation"}},
    }
    data.update(changes)
    return _write(tmp_path / "compare.yaml", data)


def _record(cfg, method: str, lr: float, seed: int, validation: float, test: float, role: str = "tune",
            wall: float = 10.0, stops: dict | None = None) -> dict:
    setting = {"training.learning_rate": lr}
    rid = run_id(method, setting, seed)
    overrides = overrides_for(cfg, cfg.methods[method], setting, seed) if method in cfg.methods else {}
    return {"run_id": rid, "method": method, "role": role, "seed": seed, "setting": setting,
            "setting_label": setting_label(setting), "metric": "piqa/accuracy", "validation": validation,
            "test": test, "eval_after": {"piqa": {"accuracy": test, "examples": 8, "loss_like": 2 * test}},
            "eval_validation": {}, "eval_before": {"piqa": {"accuracy": 0.5}}, "train_loss": 1.0, "train_steps": 2,
            "train_wall_seconds": wall, "run_seconds": wall + 5, "train_tokens": 100, "tokens_per_second": 100 / wall,
            "peak_memory_bytes": 2**30, "peak_memory_kind": "process max RSS", "optimizer_state_bytes": 1000,
            "stable_lora": stops, "split": "test split", "model": "m", "overrides": overrides,
            "base_config_sha256": cfg.base_config_sha256, "versions": {"torch": "2.13.0+cpu"},
            "machine": {"cpu_count": 2}}


def test_plan_tunes_first_then_seeds_at_the_validation_choice_then_variants(tmp_path):
    cfg = load_compare_config(_compare(tmp_path))
    assert cfg.total_runs() == 2 * (2 + 2) + 2  # 2 methods x (2 lrs + 2 report seeds) + 1 variant x 2 report seeds
    first = plan(cfg, {})
    assert [(r.method, r.role) for r in first] == [("adamw", "tune")] * 2 + [("stable-lora", "tune")] * 2
    records = {}
    # lr 1e-4 wins on validation for adamw, though its test score is worse: the test score must not matter
    for lr, val, test in ((1e-4, 0.70, 0.10), (1e-3, 0.60, 0.99)):
        r = _record(cfg, "adamw", lr, 0, val, test)
        records[r["run_id"]] = r
    runs = plan(cfg, records)
    seeds = [r for r in runs if r.method == "adamw" and r.role == "seed"]
    assert [(r.setting["training.learning_rate"], r.seed) for r in seeds] == [(1e-4, 1), (1e-4, 2)]
    assert seeds[0].overrides["training.seed"] == 1 and seeds[0].overrides["training.learning_rate"] == 1e-4
    assert not [r for r in runs if r.role == "variant"]  # stable-lora has not been tuned yet
    for lr, val in ((1e-4, 0.5), (1e-3, 0.8)):
        r = _record(cfg, "stable-lora", lr, 0, val, 0.5)
        records[r["run_id"]] = r
    variant = [r for r in plan(cfg, records) if r.role == "variant"]
    assert [r.seed for r in variant] == [1, 2] and all(r.overrides["method.stop_rule"] is False for r in variant)
    assert all(r.overrides["training.learning_rate"] == 1e-3 for r in variant)


def test_run_ids_are_exact_unique_and_ascii(tmp_path):
    ids = {run_id("adamw", {"training.learning_rate": lr}, 0) for lr in (1e-4, 1.5e-4, 2e-4, 2.5e-4, 3e-4)}
    assert len(ids) == 5 and "adamw__lr=2.5e-04__seed0" in ids  # one significant digit made 1e-4 = 1.5e-4
    assert setting_label({"training.learning_rate": 3.16e-4}) == "lr=3.16e-04"
    assert run_id("λ=0.001", {"training.learning_rate": 5e-4}, 2) == "lamda=0.001__lr=5e-04__seed2"
    assert run_id("é", {"training.learning_rate": 5e-4}, 2).isascii()
    twins = {"a b": {"set": {"method.optimizer": "adamw"}}, "a_b": {"set": {"method.optimizer": "adamw"}}}
    with pytest.raises(CompareError, match=r"'a b' at lr=1e-04, seed 0 and 'a_b' at lr=1e-04, seed 0 would both be "
                                           r"named 'a_b__lr=1e-04__seed0'; rename one"):
        load_compare_config(_compare(tmp_path, methods=twins, baseline="a b", variants={}))


def test_aggregation_maths_on_hand_made_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_compare_config(_compare(tmp_path, seeds=[0, 1, 2, 3]))
    stops = {"layers": 2, "stopped": 1, "stop_steps_by_module": {"q_proj": [4], "v_proj": [None]}}
    # the tune seed's run at the chosen setting (test 0.99) chose it: its score is left out (winner's curse)
    rows = [("adamw", 1e-4, 0, 0.70, 0.99), ("adamw", 1e-3, 0, 0.60, 0.50), ("adamw", 1e-4, 1, None, 0.62),
            ("adamw", 1e-4, 2, None, 0.60), ("adamw", 1e-4, 3, None, 0.58),
            ("stable-lora", 1e-4, 0, 0.50, 0.90), ("stable-lora", 1e-3, 0, 0.80, 0.99),
            ("stable-lora", 1e-3, 1, None, 0.66), ("stable-lora", 1e-3, 2, None, 0.63),
            ("stable-lora", 1e-3, 3, None, 0.60)]
    records = {}
    for method, lr, seed, val, test in rows:
        r = _record(cfg, method, lr, seed, val, test, role="tune" if val is not None else "seed",
                    wall=12.0 if method == "stable-lora" else 10.0, stops=stops if method == "stable-lora" else None)
        records[r["run_id"]] = r
    result = aggregate(cfg, records)
    adamw, stable = result["methods"]["adamw"], result["methods"]["stable-lora"]
    assert adamw["chosen"] == "lr=1e-04" and stable["chosen"] == "lr=1e-03"
    assert adamw["chosen_at_grid_edge"] == []  # two values have no inside: nothing to flag
    assert adamw["test"]["mean"] == pytest.approx(0.60) and adamw["test"]["std"] == pytest.approx(0.02)
    assert sorted(adamw["seeds"]) == [1, 2, 3] and adamw["test"]["max"] == pytest.approx(0.62)
    assert stable["test"]["mean"] == pytest.approx(0.63) and stable["test"]["max"] == pytest.approx(0.66)
    # paired differences 0.03, 0.04, 0.02: mean 0.03, sd 0.01, t(2) = 4.303
    half = 4.303 * 0.01 / math.sqrt(3)
    diff = stable["paired_vs_baseline"]
    assert diff["mean"] == pytest.approx(0.03) and diff["low"] == pytest.approx(0.03 - half)
    assert diff["high"] == pytest.approx(0.03 + half) and diff["n"] == 3
    assert adamw["paired_vs_baseline"] is None
    assert stable["cost_vs_baseline"]["train_wall_seconds"] == pytest.approx(1.2)
    assert stable["cost_vs_baseline"]["optimizer_state_bytes"] == pytest.approx(1.0)
    assert stable["stable_lora"]["q_proj"]["median_stop_step"] == 4
    assert stable["stable_lora"]["v_proj"]["never_stopped_fraction"] == 1.0
    assert stable["stable_lora"]["all"]["never_stopped_fraction"] == pytest.approx(0.5)
    assert stable["stop_steps_by_module"] == {"q_proj": [4, 4, 4], "v_proj": [None, None, None]}
    assert stable["other_metrics"]["piqa/loss_like"]["mean"] == pytest.approx(1.26)
    assert stable["other_metrics"]["train_loss"]["mean"] == pytest.approx(1.0)
    assert not result["complete"] and result["done"] == 10 and result["total"] == 13
    text = to_markdown(result, "stablelora compare compare.yaml")
    assert "| stable-lora | lr=1e-03 | 0.6300 ± 0.0300 (n=3) | 0.6600 |" in text
    assert "INCOMPLETE" in text and "| ablation" not in text and "## ablation" in text
    assert "paired difference against `adamw`" in text and "{" not in text.split("## Test")[0]
    assert "- Versions: torch 2.13.0+cpu. Machine: cpu_count 2." in text
    assert "| no stop rule | stable-lora | method.stop_rule=False | lr=1e-03 |" in text
    assert "| stable-lora (the method itself) | | method.optimizer=stable-lora, method.shrink_ratio=0.002 |" in text
    assert result["base_config"] == "base.yaml"  # relative to the working directory: the same file on any checkout
    assert "stop_steps.png" in plot(result, records, tmp_path / "plots")  # stopped q_proj layers; v_proj never


def test_a_sweep_runs_seed_by_seed_with_the_methods_side_by_side(tmp_path):
    cfg = load_compare_config(_compare(tmp_path, sweep=True, tune_seeds=[0, 1], variants={}))
    order = [(r.seed, r.setting["training.learning_rate"], r.method) for r in plan(cfg, {})]
    assert order == [(0, 1e-4, "adamw"), (0, 1e-4, "stable-lora"), (0, 1e-3, "adamw"), (0, 1e-3, "stable-lora"),
                     (1, 1e-4, "adamw"), (1, 1e-4, "stable-lora"), (1, 1e-3, "adamw"), (1, 1e-3, "stable-lora")]


def test_sweep_reports_every_rate_over_the_tune_seeds_with_paired_differences(tmp_path):
    cfg = load_compare_config(_compare(tmp_path, sweep=True, tune_seeds=[0, 1, 2], seeds=[0, 1, 2, 3], variants={}))
    stops = {"layers": 1, "stopped": 1, "stop_steps_by_module": {"q_proj": [6]}}
    records = {}
    for method, lr, tests in (("adamw", 1e-4, (0.50, 0.52, 0.54)), ("adamw", 1e-3, (0.60, 0.60, 0.63)),
                              ("stable-lora", 1e-4, (0.53, 0.56, 0.56)), ("stable-lora", 1e-3, (0.60, 0.61, 0.62))):
        for seed, test in enumerate(tests):
            r = _record(cfg, method, lr, seed, test - 0.1, test, stops=stops if method == "stable-lora" else None)
            records[r["run_id"]] = r
    sweep = aggregate(cfg, records)["sweep"]
    low = sweep["stable-lora"][0]
    assert [r["setting"] for r in sweep["adamw"]] == ["lr=1e-04", "lr=1e-03"] and low["test"]["n"] == 3
    assert low["test"]["mean"] == pytest.approx(0.55) and low["validation"]["mean"] == pytest.approx(0.45)
    half = 4.303 * statistics.stdev([0.53, 0.56, 0.56]) / math.sqrt(3)
    assert low["test_interval"] == pytest.approx([0.55 - half, 0.55 + half])
    # paired with adamw at the same rate: differences 0.03, 0.04, 0.02 at 1e-4; 0.00, 0.01, -0.01 at 1e-3
    assert low["paired_vs_baseline"]["mean"] == pytest.approx(0.03)
    assert sweep["stable-lora"][1]["paired_vs_baseline"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert sweep["adamw"][0]["paired_vs_baseline"] is None and low["stable_lora"]["all"]["median_stop_step"] == 6
    result = aggregate(cfg, records)
    text = to_markdown(result, "cmd")
    assert "| stable-lora | lr=1e-04 | 0.4500 | 0.5500 ± 0.0173 (n=3) | [0.5070, 0.5930] | +0.0300 [" in text
    assert "| 100% (median step 6) |" in text
    assert "lr_sweep.png" in plot(result, records, tmp_path / "plots")


def test_every_stable_lora_run_reports_its_stops_per_module_type(tmp_path):
    """Pooled stop figures hide a seed whose layers never stopped; results list every run's stops by module type."""
    cfg = load_compare_config(_compare(tmp_path, sweep=True, tune_seeds=[0, 1], variants={}))
    records = {}
    for seed, stops in ((1, {"q_proj": [None, None], "v_proj": [30, None]}),
                        (0, {"q_proj": [50, 70, 61], "v_proj": [20, 25]})):
        r = _record(cfg, "stable-lora", 1e-4, seed, 0.5, 0.5, stops={"stop_steps_by_module": stops})
        records[r["run_id"]] = r
    r = _record(cfg, "adamw", 1e-4, 0, 0.5, 0.5)
    records[r["run_id"]] = r
    result = aggregate(cfg, records)
    assert [(run["method"], run["seed"]) for run in result["stops_by_run"]] == [("stable-lora", 0), ("stable-lora", 1)]
    text = to_markdown(result, "cmd")
    assert "| method | setting | seed | role | steps trained | q_proj | v_proj | all |" in text
    assert "| stable-lora | lr=1e-04 | 0 | tune | 2 | 3/3, 61 (50–70) | 2/2, 22.5 (20–25) | 5/5, 50 (20–70) |" in text
    assert "| stable-lora | lr=1e-04 | 1 | tune | 2 | 0/2 | 1/2, 30 (30–30) | 1/4, 30 (30–30) |" in text


GSM_BASE = {**BASE, "data": {"dataset": "gsm-symbolic", "eval_size": 8, "validation_size": 8, "generate": False}}


def test_lower_is_better_metric_reports_improvement_as_positive(tmp_path):
    cfg = load_compare_config(_compare(tmp_path, base=GSM_BASE, metric="gsm-symbolic/answer_token_loss", variants={}))
    assert cfg.higher_is_better is False
    records = {}
    for method, lr, seed, val, test in (("adamw", 1e-4, 0, 2.0, 1.0), ("adamw", 1e-3, 0, 1.5, 1.2),
                                        ("adamw", 1e-3, 1, None, 1.4), ("adamw", 1e-3, 2, None, 1.5),
                                        ("stable-lora", 1e-4, 0, 1.0, 1.0), ("stable-lora", 1e-3, 0, 3.0, 1.0),
                                        ("stable-lora", 1e-4, 1, None, 1.2), ("stable-lora", 1e-4, 2, None, 1.3)):
        r = _record(cfg, method, lr, seed, val, test)
        records[r["run_id"]] = r
    result = aggregate(cfg, records)
    assert result["methods"]["adamw"]["chosen"] == "lr=1e-03"  # the lower validation loss
    assert result["methods"]["stable-lora"]["paired_vs_baseline"]["mean"] == pytest.approx(0.2)  # 0.2 lower loss


def test_a_loss_only_math_eval_needs_the_metric_named(tmp_path):
    """Math runs with data.generate=false report only a loss: judging it as higher-is-better would invert the
    comparison, so the harness refuses until the config names the metric, whose direction it then knows."""
    cfg = load_compare_config(_compare(tmp_path))
    metrics = {"task": "gsm-symbolic", "eval_after": {"gsm-symbolic": {"examples": 4, "answer_token_loss": 1.3}}}
    with pytest.raises(CompareError, match="lower is better, but higher_is_better is true. Name it, metric: "
                                           "gsm-symbolic/answer_token_loss"):
        metric_key(cfg, metrics)
    named = load_compare_config(_compare(tmp_path, base=GSM_BASE, metric="gsm-symbolic/answer_token_loss"))
    assert named.higher_is_better is False
    assert metric_key(named, metrics) == ("gsm-symbolic", "answer_token_loss")


def test_a_run_on_a_differently_split_dataset_is_not_mixed_in(tmp_path):
    cfg = load_compare_config(_compare(tmp_path))
    kept = _record(cfg, "adamw", 1e-4, 0, 0.5, 0.5)
    records = {kept["run_id"]: kept}
    same = _record(cfg, "adamw", 1e-3, 0, 0.5, 0.5)
    check_same_split(cfg, records, same)
    moved = {**same, "split": "test split, validation by templates"}
    with pytest.raises(CompareError, match="split the data differently from the kept record adamw__lr=1e-04__seed0"):
        check_same_split(cfg, records, moved)


def test_a_direction_that_contradicts_a_known_metric_is_refused(tmp_path):
    with pytest.raises(CompareError, match="'piqa/accuracy' is better when higher, but higher_is_better is false"):
        load_compare_config(_compare(tmp_path, metric="piqa/accuracy", higher_is_better=False))
    with pytest.raises(CompareError, match="better when lower, but higher_is_better is true. Remove"):
        load_compare_config(_compare(tmp_path, base=GSM_BASE, metric="gsm-symbolic/answer_token_loss",
                                     higher_is_better=True))


@pytest.mark.parametrize("metric, message", [
    ("piqa/exact_match", "metric 'piqa/exact_match' is not reported by the runs of 'adamw' (piqa, multiple_choice); "
                         "choose one of ['piqa/accuracy', 'piqa/accuracy_unnormalised']"),
    ("gsm/accuracy", "choose one of ['piqa/accuracy', 'piqa/accuracy_unnormalised']"),
    ("piqa/examples", "is not reported"),  # a count, not a score
])
def test_a_metric_the_runs_do_not_report_is_refused_before_any_run(tmp_path, metric, message):
    """It used to fail only after the first run had trained (its metrics.json lacked the key)."""
    with pytest.raises(CompareError, match=re.escape(message)):
        load_compare_config(_compare(tmp_path, metric=metric))
    assert not (tmp_path / "out").exists()


def test_a_math_metric_follows_what_the_runs_evaluate(tmp_path):
    with pytest.raises(CompareError, match=re.escape("choose one of ['gsm-symbolic/answer_token_loss', "
                                                     "'asdiv/answer_token_loss']")):
        load_compare_config(_compare(tmp_path, base=GSM_BASE, metric="gsm-symbolic/exact_match"))  # no generation
    generating = {**GSM_BASE, "data": {**GSM_BASE["data"], "generate": True}}
    assert load_compare_config(_compare(tmp_path, base=generating, metric="asdiv/exact_match")).metric == \
        "asdiv/exact_match"


def test_results_written_while_tuning_say_tuning_not_none(tmp_path):
    cfg = load_compare_config(_compare(tmp_path))
    first = _record(cfg, "adamw", 1e-4, 0, 0.6, 0.6)
    text = to_markdown(aggregate(cfg, {first["run_id"]: first}), "cmd")
    assert "None" not in text
    assert ("| stable-lora (the method itself) | | method.optimizer=stable-lora, method.shrink_ratio=0.002 | tuning |"
            in text)


def test_a_choice_at_the_end_of_the_grid_is_flagged(tmp_path):
    cfg = load_compare_config(_compare(tmp_path, learning_rates=[1e-4, 3e-4, 1e-3], variants={}))
    records = {}
    for method, best in (("adamw", 1e-4), ("stable-lora", 3e-4)):
        for lr in (1e-4, 3e-4, 1e-3):
            r = _record(cfg, method, lr, 0, 0.9 if lr == best else 0.5, 0.5)
            records[r["run_id"]] = r
    result = aggregate(cfg, records)
    assert result["methods"]["adamw"]["chosen_at_grid_edge"] == ["training.learning_rate"]
    assert result["methods"]["stable-lora"]["chosen_at_grid_edge"] == []
    assert "| adamw | lr=1e-04 (end of its grid) |" in to_markdown(result, "cmd")


@pytest.mark.parametrize("change, message", [
    ({"methods": {"adamw": {"set": {"method.optimizerr": "adamw"}}}, "variants": {}},
     "Unknown key 'method.optimizerr'"),
    ({"seeds": [0, 1], "tune_seeds": [5]}, "must be among seeds"),
    ({"seeds": [0, 1], "tune_seeds": [1, 0]}, "reported on seeds that did not choose the setting"),
    ({"sweep": True}, "sweep: true reports every rate with an interval over tune_seeds, which needs at least 2"),
    ({"sweep": "yes"}, "sweep must be true or false"),
    ({"baseline": "lora+"}, "baseline 'lora+' is not one of the methods"),
    ({"variants": {"v": {"of": "nope", "set": {}}}}, "'nope' is not one of the methods"),
    ({"learning_rates": [1e-4, "fast"]}, "learning_rates must be a non-empty list of numbers"),
    ({"methods": {"adamw": {"set": {"training.seed": 3}}}}, "set by the harness"),
    ({"metric": "accuracy"}, "metric must be 'EVAL/KEY'"),
    ({"sedes": [0]}, "unknown key"),
    ({"variants": {"big": {"of": "stable-lora", "set": {"method.shrink_ratio": 5}}}},
     "method.shrink_ratio=5.0: must be in [0, 1)"),
])
def test_bad_compare_configs_fail_before_any_run(tmp_path, change, message):
    with pytest.raises(CompareError, match=re.escape(message)):
        load_compare_config(_compare(tmp_path, **change))
    assert not (tmp_path / "out").exists()


def test_tuning_without_a_validation_split_is_refused(tmp_path):
    base = {**BASE, "data": {"dataset": "piqa", "eval_size": 8}}
    path = _compare(tmp_path)
    _write(tmp_path / "base.yaml", base)
    with pytest.raises(CompareError, match="data.validation_size"):
        load_compare_config(path)


def test_extends_inherits_a_grid_and_changes_what_it_names(tmp_path):
    parent = _compare(tmp_path, overrides={"data.max_length": 64, "data.eval_size": 8})
    (tmp_path / "child").mkdir()
    child = _write(tmp_path / "child" / "wide.yaml", {
        "extends": "../compare.yaml", "output_dir": str(tmp_path / "wide"), "overrides": {"data.eval_size": 16},
        "seeds": [0, 1]})
    cfg = load_compare_config(child)
    assert cfg.base_config == (tmp_path / "base.yaml").resolve()  # resolved against the parent that names it
    assert cfg.overrides == {"data.max_length": 64, "data.eval_size": 16}
    assert cfg.seeds == [0, 1] and list(cfg.methods) == ["adamw", "stable-lora"] and cfg.output_dir.name == "wide"
    _write(child, {"extends": "../compare.yaml", "output_dir": str(tmp_path / "wide"),
                   "methods": {"stable-lora": {"learning_rates": [1e-3, 2e-3]}, "lora+": {"set": {
                       "method.optimizer": "lora+"}}}})
    cfg = load_compare_config(child)  # a method restated only by what changes; a new one appended
    assert list(cfg.methods) == ["adamw", "stable-lora", "lora+"]
    assert cfg.methods["stable-lora"].settings_fixed == {"method.optimizer": "stable-lora",
                                                         "method.shrink_ratio": 0.002}
    assert cfg.methods["stable-lora"].tuned["training.learning_rate"] == [1e-3, 2e-3]
    assert cfg.methods["adamw"].tuned["training.learning_rate"] == [1e-4, 1e-3]
    _write(parent, {"extends": "child/wide.yaml"})
    with pytest.raises(CompareError, match="loops back"):
        load_compare_config(child)


def test_records_made_with_other_settings_are_refused(tmp_path):
    cfg = load_compare_config(_compare(tmp_path))
    r = _record(cfg, "adamw", 1e-4, 0, 0.5, 0.5)
    cfg.records_dir.mkdir(parents=True)
    (cfg.records_dir / f"{r['run_id']}.json").write_text(json.dumps(r))
    assert set(load_records(cfg)) == {r["run_id"]}
    changed = load_compare_config(_compare(tmp_path, overrides={"data.max_length": 64}))
    with pytest.raises(CompareError, match="other settings"):
        load_records(changed)


def _store(cfg, records: list[dict]) -> None:
    cfg.records_dir.mkdir(parents=True, exist_ok=True)
    for r in records:
        (cfg.records_dir / f"{r['run_id']}.json").write_text(json.dumps(r))


def test_extending_a_grid_reuses_seed_runs_once_the_choice_stands(tmp_path):
    cfg = load_compare_config(_compare(tmp_path, variants={}))
    _store(cfg, [_record(cfg, "adamw", 1e-4, 0, 0.7, 0.6), _record(cfg, "adamw", 1e-3, 0, 0.6, 0.6)])
    seeds = [r for r in plan(cfg, load_records(cfg)) if r.role == "seed"]
    _store(cfg, [{**_record(cfg, "adamw", 1e-4, r.seed, None, 0.6, role="seed"), "overrides": r.overrides}
                 for r in seeds])
    wider = load_compare_config(_compare(tmp_path, variants={}, learning_rates=[1e-5, 1e-4, 1e-3]))
    records = load_records(wider)
    assert len(records) == 4  # the seed runs stay loaded while lr=1e-5 is pending
    assert not [r for r in plan(wider, records) if r.role == "seed"]
    new = _record(wider, "adamw", 1e-5, 0, 0.5, 0.6)
    records[new["run_id"]] = new
    pending = [r.run_id for r in plan(wider, records) if r.run_id not in records and r.method == "adamw"]
    assert pending == []  # lr=1e-4 still wins: its seed runs count again, nothing is redone


def test_time_budget_starts_no_run_that_would_end_after_it(tmp_path):
    cfg = load_compare_config(_compare(tmp_path))
    _store(cfg, [_record(cfg, "adamw", 1e-4, 0, 0.5, 0.5, wall=600.0)])  # runs of adamw take ~10 min here
    lines: list[str] = []
    summary = run_grid(cfg, time_budget_minutes=5, log=lines.append)
    assert summary == {"done": 1, "total": 10, "ran": 0}
    assert any("time budget of 5 min reached" in line and "Run the same command again" in line for line in lines)
    assert not cfg.runs_dir.exists()  # nothing was started
    assert "INCOMPLETE" in (cfg.output_dir / "results.md").read_text()


@pytest.mark.parametrize("recorded, here, budget, runs", [(600.0, 60.0, 12, 8), (60.0, 600.0, 16, 1)])
def test_time_budget_expects_a_run_to_take_as_long_as_this_calls_runs(tmp_path, monkeypatch, recorded, here, budget,
                                                                      runs):
    """Records may come from another machine: once this call has finished a run, its own durations decide whether
    the next run fits (a faster machine stopped a piece 20 min early; a slower one would overrun the budget)."""
    import stablelora.benchmark.runner as runner

    cfg = load_compare_config(_compare(tmp_path))
    _store(cfg, [_record(cfg, method, 1e-4, 0, 0.5, 0.5, wall=recorded - 5) for method in ("adamw", "stable-lora")])
    clock = [0.0]

    def execute(cfg, run):  # a run that takes `here` seconds on this machine
        clock[0] += here
        record = _record(cfg, run.method, run.setting["training.learning_rate"], run.seed, 0.5, 0.5, role=run.role,
                         wall=here - 5)
        return {**record, "run_id": run.run_id, "setting": run.setting, "setting_label": setting_label(run.setting),
                "overrides": run.overrides}

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    summary = run_grid(cfg, time_budget_minutes=budget, log=lambda line: None)
    assert summary["ran"] == runs
    assert clock[0] <= budget * 60  # no run ends after the budget


def test_cli_dry_run_and_results_only(tmp_path, capsys):
    from stablelora.cli import main

    config = _compare(tmp_path)
    cfg = load_compare_config(config)
    assert main(["compare", str(config), "--results-only"]) == 2
    assert "no finished runs" in capsys.readouterr().err
    _store(cfg, [_record(cfg, "adamw", 1e-4, 0, 0.7, 0.6), _record(cfg, "adamw", 1e-3, 0, 0.6, 0.6)])
    assert main(["compare", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "done    adamw (tune) lr=1e-04 seed 0" in out and "to run  adamw (seed) lr=1e-04 seed 1" in out
    assert "2 of 10 runs done; 4 more are planned once tuning has chosen their settings" in out
    _store(cfg, [_record(cfg, "adamw", 1e-4, 1, None, 0.55, role="seed")])
    assert main(["compare", str(config), "--results-only"]) == 0
    assert "| adamw | lr=1e-04 | 0.5500 ± 0.0000 (n=1) |" in (cfg.output_dir / "results.md").read_text()


# --- a real grid on a tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer random BERT with MiniLM's real tokenizer, saved as a local model directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMultipleChoice

    from stablelora.assets.models import resolve_model

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMultipleChoice(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _processes_using(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if str(path) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _tiny_base(tiny_encoder: Path, monitor: dict) -> dict:
    """A base run config that trains the tiny encoder for 3 steps: a real grid in seconds."""
    return {"model": {"name_or_path": str(tiny_encoder)},
            "data": {"dataset": "piqa", "eval_size": 8, "validation_size": 8, "max_train_examples": 24,
                     "max_length": 48},
            "lora": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]},
            "monitor": monitor,
            "training": {"max_steps": 3, "per_device_train_batch_size": 4, "save_strategy": "no", "use_cpu": True,
                         "report_to": []}}


@pytest.mark.slow
def test_sweep_grid_killed_mid_run_resumes_without_redoing_finished_runs(tmp_path, tiny_encoder):
    _write(tmp_path / "base.yaml", _tiny_base(tiny_encoder, {"every": 1}))
    config = _write(tmp_path / "compare.yaml", {
        "base_config": "base.yaml", "output_dir": str(tmp_path / "out"), "learning_rates": [1e-3, 1e-2],
        "tune_seeds": [0, 1], "seeds": [0, 1, 2], "sweep": True,
        "methods": {"adamw": {"set": {"method.optimizer": "adamw"}},
                    "stable-lora": {"set": {"method.optimizer": "stable-lora", "method.shrink_ratio": 0.01}}}})
    records = tmp_path / "out" / "records"
    harness = subprocess.Popen([sys.executable, "-m", "stablelora.cli", "compare", str(config)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (records.is_dir() and list(records.glob("*.json"))) and time.time() < deadline:
        assert harness.poll() is None, harness.stdout.read()
        time.sleep(0.5)
    time.sleep(3)  # the second run is now in flight
    harness.send_signal(signal.SIGKILL)  # no clean-up code runs in the harness
    harness.wait()
    first = sorted(records.glob("*.json"))
    assert 1 <= len(first) < 10
    kept = {p.name: p.read_text() for p in first}
    deadline = time.time() + 30
    while _processes_using(tmp_path / "out") and time.time() < deadline:
        time.sleep(0.5)
    assert not _processes_using(tmp_path / "out"), "a training run outlived the killed harness"

    cfg = load_compare_config(config)
    lines: list[str] = []
    summary = run_grid(cfg, log=lines.append)
    assert summary == {"done": 10, "total": 10, "ran": 10 - len(first)}  # 2 methods x (2 rates x 2 seeds + 1)
    assert f"({len(first)} of 10 runs already done)" in lines[0]
    for name, text in kept.items():  # finished runs were skipped, not redone
        assert (records / name).read_text() == text
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["complete"]
    stored = load_records(cfg)
    for method in ("adamw", "stable-lora"):
        tuning = {label: statistics.fmean(r["validation"] for r in stored.values() if r["method"] == method
                                          and r["role"] == "tune" and r["setting_label"] == label)
                  for label in ("lr=1e-03", "lr=1e-02")}
        expected = "lr=1e-03" if tuning["lr=1e-03"] >= tuning["lr=1e-02"] else "lr=1e-02"  # a tie: the first listed
        assert result["methods"][method]["chosen"] == expected
        reported = [r["test"] for r in stored.values() if r["method"] == method and r["seed"] == 2
                    and r["setting_label"] == result["methods"][method]["chosen"]]  # the seed that did not choose
        assert len(reported) == 1 and result["methods"][method]["test"]["mean"] == pytest.approx(reported[0])
        # the sweep: every rate over both tune seeds, whatever was chosen
        for row in result["sweep"][method]:
            tests = {r["seed"]: r["test"] for r in stored.values() if r["method"] == method
                     and r["setting_label"] == row["setting"] and r["role"] == "tune"}
            assert sorted(tests) == [0, 1] and row["test"]["mean"] == pytest.approx(statistics.fmean(tests.values()))
            assert row["test_interval"][0] <= row["test"]["mean"] <= row["test_interval"][1]
            assert (row["paired_vs_baseline"] is None) == (method == "adamw")
    assert result["methods"]["stable-lora"]["stable_lora"]["all"]["layer_runs"] == 4  # 2 layers x 2 q,v x 1 seed
    assert [row["stable_lora"]["all"]["layer_runs"] for row in result["sweep"]["stable-lora"]] == [8, 8]
    assert (tmp_path / "out" / "plots" / "lr_sweep.png").exists()
    assert "## Learning-rate sweep: every rate, over tune seeds [0, 1]" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "plots" / "test_scores.png").exists()
    assert "complete: 10 of 10 runs" in (tmp_path / "out" / "results.md").read_text()
    # a second call has nothing left to do
    assert run_grid(cfg, log=lines.append)["ran"] == 0


@pytest.mark.slow
def test_a_diverged_run_is_recorded_as_diverged_and_never_chosen(tmp_path, tiny_encoder):
    _write(tmp_path / "base.yaml", _tiny_base(tiny_encoder, {"enabled": False}))
    config = _write(tmp_path / "compare.yaml", {
        "base_config": "base.yaml", "output_dir": str(tmp_path / "out"), "learning_rates": [1e-3, 1e30],
        "tune_seeds": [0], "seeds": [0, 1], "methods": {"adamw": {"set": {"method.optimizer": "adamw"}}}})
    cfg = load_compare_config(config)
    lines: list[str] = []
    assert run_grid(cfg, log=lines.append) == {"done": 3, "total": 3, "ran": 3}
    assert any("DIVERGED by step" in line for line in lines)
    diverged = load_records(cfg)[run_id("adamw", {"training.learning_rate": 1e30}, 0)]
    assert diverged["diverged"]["step"] >= 1 and diverged["test"] is None
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["methods"]["adamw"]["chosen"] == "lr=1e-03"
    assert [t["diverged"] for t in result["methods"]["adamw"]["tuning"]] == [0, 1]
    assert "diverged on 1 seed(s)" in (tmp_path / "out" / "results.md").read_text()


def test_an_ablation_is_paired_against_its_own_method(tmp_path, monkeypatch):
    """What the stop rule is worth: the variant against its method on the same seeds, not only against AdamW."""
    monkeypatch.chdir(tmp_path)
    cfg = load_compare_config(_compare(tmp_path, seeds=[0, 1, 2, 3]))
    rows = [(method, lr, 0, validation, 0.5) for method in ("adamw", "stable-lora")
            for lr, validation in ((1e-4, 0.5), (1e-3, 0.6))]
    rows += [("adamw", 1e-3, seed, None, 0.60) for seed in (1, 2, 3)]
    rows += [("stable-lora", 1e-3, seed, None, test) for seed, test in ((1, 0.66), (2, 0.63), (3, 0.60))]
    rows += [("no stop rule", 1e-3, seed, None, test) for seed, test in ((1, 0.62), (2, 0.60), (3, 0.58))]
    records = {}
    for method, lr, seed, validation, test in rows:
        r = _record(cfg, method, lr, seed, validation, test, role="tune" if validation is not None else "seed")
        records[r["run_id"]] = r
    result = aggregate(cfg, records)
    variant = result["variants"]["no stop rule"]
    # against stable-lora: -0.04, -0.03, -0.02 (mean -0.03, sd 0.01); against adamw: +0.02, 0.00, -0.02
    half = 4.303 * 0.01 / math.sqrt(3)
    mine = variant["paired_vs_method"]
    assert mine["mean"] == pytest.approx(-0.03) and mine["high"] == pytest.approx(-0.03 + half) and mine["n"] == 3
    assert mine["positive_means"] == "better than stable-lora"
    assert variant["paired_vs_baseline"]["mean"] == pytest.approx(0.0, abs=1e-12)
    text = to_markdown(result, "cmd")
    assert f"| -0.0300 [{-0.03 - half:+.4f}, {-0.03 + half:+.4f}] |" in text.split("| no stop rule |")[1]
    assert "| Δ vs its method [95 % CI] |" in text


def test_a_seed_that_diverged_at_the_chosen_setting_is_listed_not_averaged(tmp_path):
    cfg = load_compare_config(_compare(tmp_path, variants={}, seeds=[0, 1, 2, 3]))
    records = {}
    for method in ("adamw", "stable-lora"):
        for lr, validation in ((1e-4, 0.5), (1e-3, 0.6)):
            r = _record(cfg, method, lr, 0, validation, 0.6)
            records[r["run_id"]] = r
        for seed in (1, 2, 3):
            r = _record(cfg, method, 1e-3, seed, 0.6, 0.7, role="seed")
            records[r["run_id"]] = r
    broken = records[run_id("stable-lora", {"training.learning_rate": 1e-3}, 2)]
    broken.update(diverged={"step": 5, "message": "m"}, validation=None, test=None, train_loss=None)
    result = aggregate(cfg, records)
    entry = result["methods"]["stable-lora"]
    assert entry["diverged_seeds"] == [2] and entry["test"]["n"] == 2
    assert entry["paired_vs_baseline"]["n"] == 2
    assert "(diverged on seed(s) 2: not in the mean)" in to_markdown(result, "cmd")


def test_ctrl_c_of_compare_says_what_is_kept(tmp_path, monkeypatch, capsys):
    import stablelora.benchmark.runner as runner
    from stablelora.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_grid", interrupted)
    assert main(["compare", str(_compare(tmp_path))]) == 130
    assert "finished runs are kept in the records" in capsys.readouterr().err
