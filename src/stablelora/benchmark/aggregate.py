"""Aggregate: from run records to the comparison's figures (results.json), nothing rendered here.

Protocol, per method: the setting (learning rate and any tuned values) with the best mean *validation* score on the
tune seeds is chosen; the test metric at that setting is reported as mean ± sample std over the report seeds (those
that did not choose it), next to the best seed (the paper's protocol), and as a paired difference against the
baseline with a 95 % t-interval. Costs are means over the same runs, divided by the baseline's. Variants are reported
at their method's chosen setting, with a second paired difference against their method.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from stablelora.benchmark.grid import LEARNING_RATE, CompareConfig, chosen_setting, setting_label
from stablelora.reporting.stats import mean_interval, paired_difference, summarise

COSTS = ("train_wall_seconds", "tokens_per_second", "peak_memory_bytes", "optimizer_state_bytes")


def _relative_to_working_dir(path: Path) -> str:
    """A path relative to the working directory where it lies inside it, so that a results file written on one machine
    names the same file on another checkout (the compare config's own path is recorded as it was given)."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _final_records(cfg: CompareConfig, records: dict[str, dict], name: str, label: str,
                   seeds: list[int] | None = None) -> list[dict]:
    """The runs of one method at one setting, by seed: on the report seeds unless other seeds are named."""
    seeds = cfg.report_seeds if seeds is None else seeds
    return sorted((r for r in records.values() if r["method"] == name and r["setting_label"] == label
                   and r["seed"] in seeds), key=lambda r: r["seed"])


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    s = summarise(values)
    return {"mean": s.mean, "std": s.std, "max": s.best, "min": min(values), "n": s.n}


def _stop_steps_by_module(runs: list[dict]) -> dict[str, list]:
    """Each Stable-LoRA layer's stop step (None: never stopped), pooled over runs, by module type."""
    by_module: dict[str, list] = {}
    for run in runs:
        for module, steps in ((run.get("stable_lora") or {}).get("stop_steps_by_module") or {}).items():
            by_module.setdefault(module, []).extend(steps)
    return by_module


def _stop_statistics(by_module: dict[str, list]) -> dict | None:
    if not by_module:
        return None
    out = {}
    for module, steps in {**by_module, "all": [s for v in by_module.values() for s in v]}.items():
        stopped = [s for s in steps if s is not None]
        out[module] = {"layer_runs": len(steps), "stopped": len(stopped),
                       "never_stopped_fraction": 1 - len(stopped) / len(steps),
                       "median_stop_step": statistics.median(stopped) if stopped else None,
                       "min_stop_step": min(stopped, default=None), "max_stop_step": max(stopped, default=None)}
    return out


def _stops_by_run(cfg: CompareConfig, records: dict[str, dict]) -> list[dict]:
    """Each Stable-LoRA run's stops per module type, run by run (the reviewers' "how many steps until stable?"):
    pooled figures hide a seed or a rate whose layers never stopped."""
    order = [*cfg.methods, *cfg.variants]
    runs = sorted((r for r in records.values() if (r.get("stable_lora") or {}).get("stop_steps_by_module")),
                  key=lambda r: (order.index(r["method"]), r["setting"][LEARNING_RATE], r["setting_label"], r["seed"]))
    return [{"run_id": r["run_id"], "method": r["method"], "setting": r["setting_label"], "seed": r["seed"],
             "role": r["role"], "train_steps": r["train_steps"],
             "stops": _stop_statistics(r["stable_lora"]["stop_steps_by_module"])} for r in runs]


def _paired(cfg: CompareConfig, tests: dict[int, float], other: dict[int, float], positive_means: str) -> dict | None:
    """The paired difference over the seeds both sides share, signed so that positive means better either way."""
    if len(set(tests) & set(other)) < 2:
        return None
    diff = paired_difference(tests, other)
    sign = 1 if cfg.higher_is_better else -1
    low, high = sorted((sign * diff.low + 0.0, sign * diff.high + 0.0))  # + 0.0: no "-0.0000" for identical runs
    return {"mean": sign * diff.mean + 0.0, "low": low, "high": high, "n": diff.n, "positive_means": positive_means}


def _entry(cfg: CompareConfig, runs: list[dict], baseline: dict[int, dict]) -> dict:
    diverged = sorted(r["seed"] for r in runs if r.get("diverged"))
    runs = [r for r in runs if not r.get("diverged")]  # a diverged run has no score: it is counted, not averaged
    baseline = {seed: r for seed, r in baseline.items() if not r.get("diverged")}
    tests = {r["seed"]: r["test"] for r in runs}
    stop_steps = _stop_steps_by_module(runs)
    entry = {"seeds": tests, "test": _summary(list(tests.values())), "paired_vs_baseline": None,
             "cost": {}, "cost_vs_baseline": {}, "stable_lora": _stop_statistics(stop_steps),
             "stop_steps_by_module": stop_steps, "other_metrics": {}, "diverged_seeds": diverged}
    if runs and runs[0]["method"] != cfg.baseline:
        entry["paired_vs_baseline"] = _paired(cfg, tests, {seed: r["test"] for seed, r in baseline.items()},
                                              "better than the baseline")
    for key in COSTS:
        values = [r[key] for r in runs if r.get(key) is not None]
        base_values = [r[key] for r in baseline.values() if r.get(key) is not None]
        if values:
            entry["cost"][key] = statistics.fmean(values)
            if base_values and statistics.fmean(base_values):
                entry["cost_vs_baseline"][key] = entry["cost"][key] / statistics.fmean(base_values)
    # every other numeric test metric (e.g. the ASDiv eval, answer-token loss), except the primary and counts
    others = {(e, k) for r in runs for e, m in r["eval_after"].items() for k in m
              if f"{e}/{k}" != r["metric"] and k not in ("examples", "chance")}
    for eval_name, key in sorted(others):
        name = f"{eval_name}/{key}"
        values = [r["eval_after"][eval_name][key] for r in runs if key in r["eval_after"].get(eval_name, {})]
        entry["other_metrics"][name] = _summary(values)
    if runs:  # the mean training loss over each run's steps: a finer signal than a coarse test score
        entry["other_metrics"]["train_loss"] = _summary([r["train_loss"] for r in runs])
    return entry


def _sweep(cfg: CompareConfig, records: dict[str, dict]) -> dict:
    """Every method at every setting, over the tune seeds: the test metric against the learning rate (mean ± std,
    95 % interval of the mean), the paired difference against the baseline at the same rate, and how many
    Stable-LoRA layers stopped. No setting is chosen here, so no score carries a winner's curse."""
    baseline_at = {s[LEARNING_RATE]: {r["seed"]: r for r in _final_records(cfg, records, cfg.baseline,
                                                                             setting_label(s), cfg.tune_seeds)}
                   for s in cfg.methods[cfg.baseline].settings()}
    sweep = {}
    for method in cfg.methods.values():
        rows = []
        for setting in method.settings():
            label = setting_label(setting)
            runs = _final_records(cfg, records, method.name, label, cfg.tune_seeds)
            others = {key: value for key, value in setting.items() if key != LEARNING_RATE}
            row = {"setting": label, "learning_rate": setting[LEARNING_RATE], "other_values": setting_label(others),
                   "validation": _summary([r["validation"] for r in runs if r["validation"] is not None]),
                   **_entry(cfg, runs, baseline_at.get(setting[LEARNING_RATE], {}))}
            tests = list(row["seeds"].values())
            row["test_interval"] = list(mean_interval(tests)) if len(tests) >= 2 else None
            rows.append(row)
        sweep[method.name] = rows
    return sweep


def _at_edge(values: list, value) -> bool:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return numeric and len(values) > 2 and value in (min(values), max(values))


def aggregate(cfg: CompareConfig, records: dict[str, dict]) -> dict:
    methods, chosen = {}, {}
    for method in cfg.methods.values():
        best = chosen_setting(cfg, method, records)
        chosen[method.name] = best
    base_label = setting_label(chosen[cfg.baseline]) if chosen[cfg.baseline] else None
    baseline = {r["seed"]: r for r in _final_records(cfg, records, cfg.baseline, base_label)} if base_label else {}
    for method in cfg.methods.values():
        tuning = []
        for setting in method.settings():
            label = setting_label(setting)
            tuned = [r for r in records.values() if r["method"] == method.name and r["setting_label"] == label
                     and r["seed"] in cfg.tune_seeds]
            values = [r["validation"] for r in tuned if r["validation"] is not None]
            tuning.append({"setting": label, "validation_mean": statistics.fmean(values) if values else None,
                           "n": len(values), "diverged": sum(1 for r in tuned if r.get("diverged"))})
        label = setting_label(chosen[method.name]) if chosen[method.name] else None
        runs = _final_records(cfg, records, method.name, label) if label else []
        # a choice at the end of a tuned range says the best value may lie beyond it: extend the grid
        at_edge = sorted(key for key, values in method.tuned.items()
                         if chosen[method.name] and _at_edge(values, chosen[method.name][key]))
        methods[method.name] = {"fixed": method.settings_fixed, "tuning": tuning, "chosen": label,
                                "chosen_at_grid_edge": at_edge, **_entry(cfg, runs, baseline)}
    variants = {}
    for variant in cfg.variants.values():
        label = setting_label(chosen[variant.of]) if chosen[variant.of] else None
        runs = _final_records(cfg, records, variant.name, label) if label else []
        entry = _entry(cfg, runs, baseline)
        # an ablation asks what its change is worth to the method, on the same seeds
        entry["paired_vs_method"] = _paired(cfg, entry["seeds"], methods[variant.of]["seeds"],
                                            f"better than {variant.of}")
        variants[variant.name] = {"of": variant.of, "group": variant.group, "changes": variant.changes,
                                  "setting": label, **entry}
    any_record = next(iter(records.values()), {})
    return {
        "config": str(cfg.path), "description": cfg.description,
        "base_config": _relative_to_working_dir(cfg.base_config),
        "done": len(records), "total": cfg.total_runs(), "complete": len(records) >= cfg.total_runs(),
        "metric": any_record.get("metric", cfg.metric), "higher_is_better": cfg.higher_is_better,
        "baseline": cfg.baseline, "seeds": cfg.seeds, "tune_seeds": cfg.tune_seeds,
        "report_seeds": cfg.report_seeds,
        "split": any_record.get("split"), "model": any_record.get("model"),
        "eval_before": any_record.get("eval_before"), "versions": any_record.get("versions"),
        "machine": any_record.get("machine"), "peak_memory_kind": any_record.get("peak_memory_kind"),
        "methods": methods, "variants": variants, "sweep": _sweep(cfg, records) if cfg.sweep else None,
        "stops_by_run": _stops_by_run(cfg, records),
    }
