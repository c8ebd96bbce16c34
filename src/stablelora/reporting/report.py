"""``stablelora report RUN_DIR [RUN_DIR ...]``: stability plots and a Markdown summary from run directories.

Reads only the run-directory contract: metrics.json, monitor.jsonl, log_history.json, config.yaml and
stable_lora_status.json. The monitor samples every few steps, so which layers have stopped is taken from
stable_lora_status.json (the optimizer at the end of training) where the run has one. Writes PNGs and report.md
into the output directory:
  norms.png        median ||A||_F and ||B||_F over steps, one panel per module type, runs overlaid (paper Fig. 2)
  shrinking.png    fraction of LoRA layers still shrinking over steps (Stable-LoRA runs)
  stop_steps.png   histogram of the step at which each layer stopped shrinking, by module type
  delta_ratio.png  median delta1/delta2 (A-path over B-path output update) over steps
  loss.png         training loss over steps
  eval.png         headline eval metric before and after training
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stablelora.eval import headline
from stablelora.fileio import write_atomic


class ReportError(ValueError):
    """Input that cannot be reported on; the message says what is missing."""


@dataclass
class Run:
    path: Path
    label: str
    metrics: dict | None
    records: list[dict]
    log_history: list[dict] = field(default_factory=list)
    final_stops: dict | None = None  # stable_lora_status.json: each layer's stop step when training ended

    def stops(self) -> tuple[int | None, list[dict]]:
        """The step and the per-layer stop steps (name, type, stop_step) of the latest Stable-LoRA status: the end
        of training where the run wrote one, else the monitor's last sample ([] for a run without either)."""
        if self.final_stops is not None:
            return (self.metrics or {}).get("train_steps"), self.final_stops["per_layer"]
        flagged = [layer for layer in self.records[-1]["layers"] if "shrinking" in layer] if self.records else []
        return (self.records[-1]["step"] if flagged else None), flagged


def _label(path: Path, config: dict | None, metrics: dict | None) -> str:
    method = (metrics or {}).get("method") or (config or {}).get("method") or {}
    optimizer = method.get("optimizer", "?")
    adapters = [a for a in method.get("adapter", ["default"]) if a != "default"]
    method_name = optimizer + (f"+{'+'.join(adapters)}" if adapters else "")
    return method_name if path.name == method_name else f"{path.name}: {method_name}"


def _read(path: Path, parse, missing):
    """A run file, or ``missing`` where the run has none. stablelora writes each file whole, so one that does not parse
    was changed or cut by something else: say which, rather than fail with a parser's traceback."""
    if not path.exists():
        return missing
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        detail = (f"{err.problem}, line {err.problem_mark.line + 1}" if isinstance(err, yaml.MarkedYAMLError)
                  else str(err).splitlines()[0])
        raise ReportError(f"{path} cannot be read ({detail}); restore it from the run or leave that run out of the "
                          "report.") from err


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory; give run directories written by 'stablelora train'.")
    monitor = path / "monitor.jsonl"
    metrics_path, config_path = path / "metrics.json", path / "config.yaml"
    if not monitor.exists() and not metrics_path.exists() and not config_path.exists():
        raise ReportError(f"{path} is not a run directory (no metrics.json, config.yaml or monitor.jsonl).")
    by_step: dict[int, dict] = {}
    lines = monitor.read_text().splitlines() if monitor.exists() else []  # none: trained with the monitor off
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if n == len(lines):  # the line being appended when the run was killed: drop it
                    continue
                raise ReportError(f"{monitor}:{n} is not valid JSON ({err.msg}).") from err
            by_step[record["step"]] = record  # a resumed run re-records steps after its checkpoint: keep the last
    metrics = _read(metrics_path, json.loads, None)
    config = _read(config_path, yaml.safe_load, None)
    history = _read(path / "log_history.json", json.loads, [])
    final_stops = _read(path / "stable_lora_status.json", json.loads, None)
    return Run(path=path, label=_label(path, config, metrics), metrics=metrics,
               records=[by_step[s] for s in sorted(by_step)], log_history=history, final_stops=final_stops)


def _series_by_type(run: Run, key: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for record in run.records:
        groups: dict[str, list[float]] = defaultdict(list)
        for layer in record["layers"]:
            if layer.get(key) is not None:
                groups[layer["type"]].append(layer[key])
        for kind, values in groups.items():
            series[kind][0].append(record["step"])
            series[kind][1].append(statistics.median(values))
    return dict(series)


def _plot_norms(runs: list[Run], types: list[str], colours: dict, save) -> None:
    import matplotlib.pyplot as plt

    cols = min(3, len(types))
    rows = -(-len(types) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, kind in zip(axes.flat, types):
        for run in runs:
            for key, style in (("a_norm", "-"), ("b_norm", "--")):
                steps, values = _series_by_type(run, key).get(kind, ([], []))
                if steps:
                    ax.plot(steps, values, style, color=colours[run.label],
                            label=f"{run.label} {'‖A‖' if key == 'a_norm' else '‖B‖'}")
        ax.set_title(kind)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("median Frobenius norm")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    save(fig, "norms.png", "‖A‖_F (solid) and ‖B‖_F (dashed) per module type, median over layers")


def write_report(run_dirs: list[str | Path], output: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(p) for p in run_dirs]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    colours = {run.label: plt.cm.tab10(i % 10) for i, run in enumerate(runs)}
    images: list[tuple[str, str]] = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out / name)
        plt.close(fig)
        images.append((name, caption))

    types = sorted({layer["type"] for run in runs for r in run.records for layer in r["layers"]})
    if types:
        _plot_norms(runs, types, colours, save)

    stable_runs = [r for r in runs if r.stops()[1]]
    if stable_runs:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for run in stable_runs:
            points = [(r["step"], r["summary"]["shrinking_fraction"]) for r in run.records
                      if r["summary"].get("shrinking_fraction") is not None]
            step, layers = run.stops()
            if step is not None and (not points or step > points[-1][0]):
                points.append((step, sum(layer["stop_step"] is None for layer in layers) / len(layers)))
            ax.plot(*zip(*points), color=colours[run.label], label=run.label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("fraction of LoRA layers still shrinking")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "shrinking.png", "Fraction of LoRA layers still shrinking (Stable-LoRA runs)")

        fig, axes = plt.subplots(1, len(stable_runs), figsize=(6 * len(stable_runs), 3.8), squeeze=False)
        for ax, run in zip(axes.flat, stable_runs):
            step, layers = run.stops()
            stops: dict[str, list[int]] = defaultdict(list)
            for layer in layers:
                if layer["stop_step"] is not None:
                    stops[layer["type"]].append(layer["stop_step"])
            if stops:
                ax.hist(list(stops.values()), bins=20, stacked=True, label=list(stops.keys()))
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no layer has stopped yet", ha="center", va="center", transform=ax.transAxes)
            never = len(layers) - sum(map(len, stops.values()))
            ax.set_title(f"{run.label}\n({never} layer(s) still shrinking at step {step})", fontsize=9)
            ax.set_xlabel("stop step")
            ax.set_ylabel("LoRA layers")
        save(fig, "stop_steps.png", "Step at which each LoRA layer stopped shrinking, by module type")

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for run in runs:
        points = [(r["step"], r["summary"]["median_delta_ratio"]) for r in run.records
                  if r["summary"].get("median_delta_ratio")]
        if points:
            ax.plot(*zip(*points), color=colours[run.label], label=run.label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("median δ1 / δ2 (A-path / B-path)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "delta_ratio.png", "Balance of the first-order output updates: δ1 = s·ΔB·A·x over δ2 = s·B·ΔA·x")

    if any(run.log_history for run in runs):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for run in runs:
            points = [(h["step"], h["loss"]) for h in run.log_history if "loss" in h and "step" in h]
            if points:
                ax.plot(*zip(*points), color=colours[run.label], label=run.label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "loss.png", "Training loss")

    with_metrics = [run for run in runs if run.metrics]
    if with_metrics:
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(with_metrics)), 3.8))
        for i, run in enumerate(with_metrics):
            task = run.metrics["task"]
            key, before = headline(run.metrics["eval_before"][task])
            _, after = headline(run.metrics["eval_after"][task])
            ax.bar([i - 0.2, i + 0.2], [before, after], width=0.38, color=[(0.7, 0.7, 0.7), colours[run.label]])
            ax.text(i + 0.2, after, f"{after:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(with_metrics)), [r.label for r in with_metrics], rotation=15, fontsize=8)
        ax.set_ylabel(f"{key} (grey: before, colour: after)")
        save(fig, "eval.png", "Headline eval metric before (grey) and after training")

    lines = ["# Stability report", "", f"Runs: {', '.join(str(r.path) for r in runs)}", "",
             "| run | task | eval before → after | mean train loss | layers stopped (at step) | median stop step | "
             "final median δ1/δ2 |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        step, layers = run.stops()
        stop_steps = [layer["stop_step"] for layer in layers if layer["stop_step"] is not None]
        stopped = f"{len(stop_steps)}/{len(layers)} ({step})" if layers else "n/a"
        median_stop = statistics.median(stop_steps) if stop_steps else None
        ratio = run.records[-1]["summary"].get("median_delta_ratio") if run.records else None
        if run.metrics:
            task = run.metrics["task"]
            key, before = headline(run.metrics["eval_before"][task])
            _, after = headline(run.metrics["eval_after"][task])
            evals, loss = f"{key} {before:.3f} → {after:.3f}", f"{run.metrics['train_loss']:.4f}"
        else:
            task, evals, loss = "?", "(no metrics.json)", "?"
        lines.append(f"| {run.label} | {task} | {evals} | {loss} | {stopped} | "
                     f"{median_stop if median_stop is not None else 'n/a'} | "
                     f"{f'{ratio:.3g}' if ratio else 'n/a'} |")
    lines.append("")
    lines += [f"{run.label}: no monitor data (monitor.jsonl; trained with monitor.enabled=false?), so no norm, "
              "shrink or δ plots for it." for run in runs if not run.records]
    lines.append("")
    for name, caption in images:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    report = out / "report.md"
    write_atomic(report, "\n".join(lines))
    return report
