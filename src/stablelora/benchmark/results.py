"""From run records to the comparison: results.json (every figure), results.md (tables), plots/.

Protocol, per method: the setting (learning rate and any tuned values) with the best mean *validation* score on the
tune seeds is chosen; the test metric at that setting is reported as mean ± sample std over the report seeds (those
that did not choose it), next to the best seed (the paper's protocol), and as a paired difference against the
baseline with a 95 % t-interval. Costs are means over the same runs, divided by the baseline's. Variants are reported
at their method's chosen setting.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from stablelora.benchmark.grid import LEARNING_RATE, CompareConfig, chosen_setting, planned_records, setting_label
from stablelora.fileio import write_atomic, write_json
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
        out[module] = {"layer_runs": len(steps), "never_stopped_fraction": 1 - len(stopped) / len(steps),
                       "median_stop_step": statistics.median(stopped) if stopped else None,
                       "min_stop_step": min(stopped, default=None), "max_stop_step": max(stopped, default=None)}
    return out


def _entry(cfg: CompareConfig, runs: list[dict], baseline: dict[int, dict]) -> dict:
    diverged = sorted(r["seed"] for r in runs if r.get("diverged"))
    runs = [r for r in runs if not r.get("diverged")]  # a diverged run has no score: it is counted, not averaged
    baseline = {seed: r for seed, r in baseline.items() if not r.get("diverged")}
    tests = {r["seed"]: r["test"] for r in runs}
    stop_steps = _stop_steps_by_module(runs)
    entry = {"seeds": tests, "test": _summary(list(tests.values())), "paired_vs_baseline": None,
             "cost": {}, "cost_vs_baseline": {}, "stable_lora": _stop_statistics(stop_steps),
             "stop_steps_by_module": stop_steps, "other_metrics": {}, "diverged_seeds": diverged}
    base_tests = {seed: r["test"] for seed, r in baseline.items()}
    if runs and runs[0]["method"] != cfg.baseline and len(set(tests) & set(base_tests)) >= 2:
        diff = paired_difference(tests, base_tests)
        sign = 1 if cfg.higher_is_better else -1  # report "better than baseline" as positive either way
        low, high = sorted((sign * diff.low, sign * diff.high))
        entry["paired_vs_baseline"] = {"mean": sign * diff.mean, "low": low, "high": high, "n": diff.n,
                                       "positive_means": "better than the baseline"}
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
        variants[variant.name] = {"of": variant.of, "group": variant.group, "changes": variant.changes,
                                  "setting": label, **_entry(cfg, runs, baseline)}
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
    }


def _pm(summary: dict | None) -> str:
    return f"{summary['mean']:.4f} ± {summary['std']:.4f} (n={summary['n']})" if summary else "–"


def _ratio(entry: dict, key: str) -> str:
    ratio = entry["cost_vs_baseline"].get(key)
    return f"{ratio:.3f}×" if ratio is not None else "–"


def _delta(entry: dict) -> str:
    d = entry["paired_vs_baseline"]
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "–"


def _best(result: dict, summary: dict | None) -> str:
    """The best seed's score: the paper's best-of-seeds protocol."""
    if not summary:
        return "–"
    return f"{summary['max' if result['higher_is_better'] else 'min']:.4f}"


def _assignments(mapping: dict) -> str:
    """Config overrides as they would be written on a command line: `method.shrink_ratio=0.0005`."""
    return ", ".join(f"{key}={value}" for key, value in mapping.items())


def _diverged(entry: dict) -> str:
    seeds = entry.get("diverged_seeds")
    return f" (diverged on seed(s) {', '.join(map(str, seeds))}: not in the mean)" if seeds else ""


def _key_values(mapping: dict | None) -> str:
    return ", ".join(f"{key} {value}" for key, value in (mapping or {}).items()) or "not recorded"


def to_markdown(result: dict, command: str) -> str:
    lines = [f"# Comparison: {Path(result['config']).stem}", ""]
    if result["description"]:
        lines += [result["description"], ""]
    status = "complete" if result["complete"] else "INCOMPLETE (run the command again to continue)"
    direction = "higher is better" if result["higher_is_better"] else "lower is better"
    lines += [
        f"Command: `{command}`", "",
        f"Status: {status}: {result['done']} of {result['total']} runs.", "",
        f"- Model: {result['model']}. Metric: `{result['metric']}` on the test split ({direction}).",
        f"- Split: {result['split']}",
        f"- Protocol: each method's setting is chosen by mean validation score over tune seeds "
        f"{result['tune_seeds']} (the test split is never read for this); the test metric is then reported over "
        f"seeds {result['report_seeds']} at that setting, which did not choose it (a tune seed's winning run would "
        f"carry a winner's curse); \"end of its grid\" marks a choice at the lowest or highest "
        f"tuned value, where a better one may lie outside the grid. Δ is the paired difference against `{result['baseline']}` "
        "(same seeds), with a 95 % t-interval; positive means better than the baseline.",
        f"- Versions: {_key_values(result['versions'])}. Machine: {_key_values(result['machine'])}.", "",
        f"## Test {result['metric']} at the setting chosen on validation", "",
        "| method | chosen setting | test mean ± std | best of seeds | Δ vs baseline [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        edge = " (end of its grid)" if m["chosen_at_grid_edge"] else ""
        lines.append(f"| {name} | {m['chosen'] or 'tuning'}{edge} | {_pm(m['test'])}{_diverged(m)} | "
                     f"{_best(result, m['test'])} | {_delta(m)} |")
    before = result.get("eval_before") or {}
    metric_eval, metric_key = result["metric"].split("/") if result["metric"] else (None, None)
    if metric_eval in before and metric_key in before[metric_eval]:
        lines += ["", f"Before training (B = 0, the base model): {before[metric_eval][metric_key]:.4f}."]
    groups: dict[str, list] = {}
    for name, v in result["variants"].items():
        groups.setdefault(v["group"], []).append((name, v))
    for group, variants in groups.items():
        lines += ["", f"## {group}", "",
                  "Each variant runs at the learning rate (and tuned values) chosen for its method, on the report seeds.", "",
                  "| variant | of | changes | setting | test mean ± std | best of seeds | Δ vs baseline [95 % CI] |",
                  "|---|---|---|---|---|---|---|"]
        shown = set()
        for name, v in variants:
            if v["of"] not in shown:
                shown.add(v["of"])
                m = result["methods"][v["of"]]
                lines.append(f"| {v['of']} (the method itself) | | {_assignments(m['fixed'])} | {m['chosen']} "
                             f"| {_pm(m['test'])} | {_best(result, m['test'])} | {_delta(m)} |")
            lines.append(f"| {name} | {v['of']} | {_assignments(v['changes'])} | {v['setting'] or 'waiting'} "
                         f"| {_pm(v['test'])}{_diverged(v)} | {_best(result, v['test'])} | {_delta(v)} |")
    everything = {**result["methods"], **result["variants"]}
    lines += ["", f"## Cost relative to `{result['baseline']}` (means over the same runs)", "",
              "| method | train wall s | × | tokens/s | × | peak memory MiB | × | optimizer state MiB | × |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, m in everything.items():
        c = m["cost"]
        if not c:
            continue
        cells = [f"{c.get('train_wall_seconds', 0):.1f}", _ratio(m, "train_wall_seconds"),
                 f"{c.get('tokens_per_second', 0):.1f}", _ratio(m, "tokens_per_second"),
                 f"{c.get('peak_memory_bytes', 0) / 2**20:.0f}", _ratio(m, "peak_memory_bytes"),
                 f"{c.get('optimizer_state_bytes', 0) / 2**20:.3f}", _ratio(m, "optimizer_state_bytes")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Peak memory: {result['peak_memory_kind']}. On CPU that is the whole process (model, data and the "
              "evaluation before training included), so optimizer state is a small part of it."]
    stops = [(n, m["stable_lora"]) for n, m in everything.items() if m["stable_lora"]]
    if stops:
        lines += ["", "## Stable-LoRA: steps to stop, per module type (layers × seeds pooled)", "",
                  "| method | module | layer-runs | median stop step | range | never stopped |", "|---|---|---|---|---|---|"]
        for name, per_module in stops:
            for module, s in per_module.items():
                span = f"{s['min_stop_step']}–{s['max_stop_step']}" if s["median_stop_step"] is not None else "–"
                median = s["median_stop_step"] if s["median_stop_step"] is not None else "–"
                lines.append(f"| {name} | {module} | {s['layer_runs']} | {median} | {span} | "
                             f"{s['never_stopped_fraction']:.0%} |")
    lines += ["", "## Tuning on validation", "", "| method | setting | validation mean (n) | chosen |", "|---|---|---|---|"]
    for name, m in result["methods"].items():
        for t in m["tuning"]:
            value = f"{t['validation_mean']:.4f} ({t['n']})" if t["validation_mean"] is not None else "–"
            if t.get("diverged"):
                value += f", diverged on {t['diverged']} seed(s)"
            lines.append(f"| {name} | {t['setting']} | {value} | {'✓' if t['setting'] == m['chosen'] else ''} |")
    if result.get("sweep"):
        lines += _sweep_markdown(result)
    other = sorted({k for m in everything.values() for k in m["other_metrics"]})
    if other:
        lines += ["", "## Other metrics: the other test evaluations and the mean training loss (mean ± std over the same runs)", "",
                  "| method | " + " | ".join(other) + " |", "|---|" + "---|" * len(other)]
        for name, m in everything.items():
            if m["test"]:
                lines.append(f"| {name} | " + " | ".join(_pm(m["other_metrics"].get(k)) for k in other) + " |")
    lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in result.get("plots", [])]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _stopped(entry: dict) -> str:
    stops = (entry.get("stable_lora") or {}).get("all")
    if not stops:
        return "–"
    median = stops["median_stop_step"]
    return f"{1 - stops['never_stopped_fraction']:.0%}" + (f" (median step {median:g})" if median is not None else "")


def _sweep_markdown(result: dict) -> list[str]:
    lines = ["", f"## Learning-rate sweep: every rate, over tune seeds {result['tune_seeds']}", "",
             "No rate is chosen here, so these scores carry no winner's curse. The interval is the 95 % t-interval "
             f"of the mean over seeds; Δ pairs each seed with `{result['baseline']}` at the same rate (positive = "
             "better). Layers stopped: Stable-LoRA layer-runs that reached the stop condition.", "",
             "| method | setting | validation mean | test mean ± std | 95 % CI of the mean | Δ vs baseline [95 % CI] "
             "| layers stopped |", "|---|---|---|---|---|---|---|"]
    for name, rows in result["sweep"].items():
        for row in rows:
            interval = "[{:.4f}, {:.4f}]".format(*row["test_interval"]) if row["test_interval"] else "–"
            validation = f"{row['validation']['mean']:.4f}" if row["validation"] else "–"
            lines.append(f"| {name} | {row['setting']} | {validation} | {_pm(row['test'])}{_diverged(row)} | "
                         f"{interval} | {_delta(row)} | {_stopped(row)} |")
    return lines


def _plot_sweep(result: dict, out: Path, plt) -> str | None:
    """Test metric against learning rate per method (mean and 95 % band), and the paired Δ against the baseline."""
    curves = {name: [r for r in rows if r["test"]] for name, rows in result["sweep"].items()}
    if not any(len(rows) > 1 for rows in curves.values()):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, rows) in enumerate(curves.items()):
        for others in sorted({r["other_values"] for r in rows}):  # one curve per value of the other tuned keys
            line = [r for r in rows if r["other_values"] == others]
            label = f"{name} {others}".strip()
            rates = [r["learning_rate"] for r in line]
            left.plot(rates, [r["test"]["mean"] for r in line], "o-", color=f"C{i}", label=label)
            banded = [r for r in line if r["test_interval"]]
            left.fill_between([r["learning_rate"] for r in banded], [r["test_interval"][0] for r in banded],
                              [r["test_interval"][1] for r in banded], color=f"C{i}", alpha=0.15)
            paired = [r for r in line if r["paired_vs_baseline"]]
            if paired:
                d = [r["paired_vs_baseline"] for r in paired]
                right.errorbar([r["learning_rate"] for r in paired], [x["mean"] for x in d],
                               yerr=[[x["mean"] - x["low"] for x in d], [x["high"] - x["mean"] for x in d]],
                               fmt="o-", color=f"C{i}", capsize=3, label=label)
    left.set(xscale="log", xlabel="learning rate", ylabel=f"test {result['metric']}",
             title=f"mean and 95 % interval over seeds {result['tune_seeds']}")
    right.axhline(0, color="grey", lw=1)
    right.set(xscale="log", xlabel="learning rate", ylabel=f"paired Δ vs {result['baseline']} (positive = better)",
              title="paired difference at each rate, 95 % interval")
    left.legend(fontsize=7)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lr_sweep.png", dpi=110)
    plt.close(fig)
    return "lr_sweep.png"


def plot(result: dict, records: dict[str, dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    everything = {n: m for n, m in {**result["methods"], **result["variants"]}.items() if m["test"]}
    if everything:
        names = list(everything)
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4))
        for i, name in enumerate(names):
            m = everything[name]
            ax.errorbar(i, m["test"]["mean"], yerr=m["test"]["std"], fmt="o", color="C0", capsize=4)
            ax.scatter([i] * len(m["seeds"]), list(m["seeds"].values()), color="C1", s=12, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylabel(result["metric"])
        ax.set_title("test metric: mean ± std (blue), seeds (orange)")
        fig.tight_layout()
        fig.savefig(out / "test_scores.png", dpi=110)
        plt.close(fig)
        written.append("test_scores.png")
    diffs = {n: m["paired_vs_baseline"] for n, m in {**result["methods"], **result["variants"]}.items()
             if m["paired_vs_baseline"]}
    if diffs:
        names = list(diffs)
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5))
        for i, name in enumerate(names):
            d = diffs[name]
            ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=4)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(f"paired Δ vs {result['baseline']} (positive = better), 95 % CI")
        fig.tight_layout()
        fig.savefig(out / "paired_difference.png", dpi=110)
        plt.close(fig)
        written.append("paired_difference.png")
    lr_curves = {}
    for r in records.values():
        if r["role"] == "tune" and r["validation"] is not None:
            others = {k: v for k, v in r["setting"].items() if k != "training.learning_rate"}
            label = r["method"] + (f" {setting_label(others)}" if others else "")
            lr_curves.setdefault(label, {}).setdefault(r["setting"]["training.learning_rate"], []).append(
                r["validation"])
    if any(len(points) > 1 for points in lr_curves.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, points in sorted(lr_curves.items()):
            lrs = sorted(points)
            ax.plot(lrs, [statistics.fmean(points[lr]) for lr in lrs], "o-", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"validation {result['metric']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "tuning.png", dpi=110)
        plt.close(fig)
        written.append("tuning.png")
    stop_runs = {}  # stopped layers only: a box plot of steps cannot show "never"; the table gives that fraction
    for name, m in {**result["methods"], **result["variants"]}.items():
        stopped = {module: [s for s in steps if s is not None] for module, steps in m["stop_steps_by_module"].items()}
        if any(stopped.values()):
            stop_runs[name] = {module: steps for module, steps in stopped.items() if steps}
    if stop_runs:
        fig, axes = plt.subplots(1, len(stop_runs), figsize=(4 * len(stop_runs), 3.5), squeeze=False)
        for ax, (name, modules) in zip(axes[0], stop_runs.items()):
            ax.boxplot(list(modules.values()), tick_labels=list(modules))
            ax.set_title(name, fontsize=9)
            ax.set_ylabel("stop step (stopped layers)")
            ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / "stop_steps.png", dpi=110)
        plt.close(fig)
        written.append("stop_steps.png")
    if result.get("sweep") and (sweep_png := _plot_sweep(result, out, plt)):
        written.append(sweep_png)
    return written


def write_results(cfg: CompareConfig, records: dict[str, dict]) -> dict:
    records = planned_records(cfg, records)
    result = aggregate(cfg, records)
    result["plots"] = plot(result, records, cfg.output_dir / "plots")
    command = f"stablelora compare {cfg.path}"
    write_json(cfg.output_dir / "results.json", result)
    write_atomic(cfg.output_dir / "results.md", to_markdown(result, command))
    return result
