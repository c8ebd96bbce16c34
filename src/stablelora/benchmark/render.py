"""Render: the aggregated comparison as results.md (tables) and plots/, written with results.json after every run."""

from __future__ import annotations

import statistics
from pathlib import Path

from stablelora.benchmark.aggregate import aggregate
from stablelora.benchmark.grid import CompareConfig, planned_records, setting_label
from stablelora.fileio import write_atomic, write_json


def _pm(summary: dict | None) -> str:
    return f"{summary['mean']:.4f} ± {summary['std']:.4f} (n={summary['n']})" if summary else "–"


def _ratio(entry: dict, key: str) -> str:
    ratio = entry["cost_vs_baseline"].get(key)
    return f"{ratio:.3f}×" if ratio is not None else "–"


def _delta(entry: dict, key: str = "paired_vs_baseline") -> str:
    d = entry[key]
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
                  "Each variant runs at the learning rate (and tuned values) chosen for its method, on the report "
                  "seeds. Δ vs its method is paired on those seeds; positive means the variant is better than its "
                  "method.", "",
                  "| variant | of | changes | setting | test mean ± std | best of seeds | Δ vs baseline [95 % CI] "
                  "| Δ vs its method [95 % CI] |",
                  "|---|---|---|---|---|---|---|---|"]
        shown = set()
        for name, v in variants:
            if v["of"] not in shown:
                shown.add(v["of"])
                m = result["methods"][v["of"]]
                lines.append(f"| {v['of']} (the method itself) | | {_assignments(m['fixed'])} "
                             f"| {m['chosen'] or 'tuning'} | {_pm(m['test'])} | {_best(result, m['test'])} "
                             f"| {_delta(m)} | – |")
            lines.append(f"| {name} | {v['of']} | {_assignments(v['changes'])} | {v['setting'] or 'waiting'} "
                         f"| {_pm(v['test'])}{_diverged(v)} | {_best(result, v['test'])} | {_delta(v)} "
                         f"| {_delta(v, 'paired_vs_method')} |")
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
    lines += _stops_by_run_markdown(result["stops_by_run"])
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


def _stops_cell(s: dict) -> str:
    if not s["stopped"]:
        return f"0/{s['layer_runs']}"
    return f"{s['stopped']}/{s['layer_runs']}, {s['median_stop_step']:g} ({s['min_stop_step']}–{s['max_stop_step']})"


def _stops_by_run_markdown(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    modules = sorted({m for run in runs for m in run["stops"] if m != "all"}) + ["all"]
    lines = ["", "## Stable-LoRA: stops in every run", "",
             "Per module type: layers stopped of all, then the median stop step (first–last stopped).", "",
             "| method | setting | seed | role | steps trained | " + " | ".join(modules) + " |",
             "|---|---|---|---|---|" + "---|" * len(modules)]
    for run in runs:
        cells = [_stops_cell(run["stops"][m]) if m in run["stops"] else "–" for m in modules]
        lines.append(f"| {run['method']} | {run['setting']} | {run['seed']} | {run['role']} | {run['train_steps']} | "
                     + " | ".join(cells) + " |")
    return lines


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
