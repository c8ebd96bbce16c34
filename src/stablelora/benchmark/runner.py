"""Runs a comparison grid: one ``stablelora train`` subprocess per run, one small JSON record per finished run.

Resumable by construction: a run counts as done only when its record exists, and a record is written (atomically)
after the run's metrics are on disk. A killed harness therefore loses at most the run in flight, whose directory is
wiped and started over next time. Each run is its own process, so its peak memory is its own and a crash in one run
cannot corrupt the next; the child is tied to the harness (it dies with it), so no run outlives a piece.

OUT/records/RUN_ID.json   the record of a finished run (small; commit these, the next piece resumes from them)
OUT/runs/RUN_ID/          the full run directory (adapter, logs, monitor data; large, not committed)
OUT/eval_before.json      the untrained model's evaluation, shared by every run (B = 0 means the base model)
OUT/results.md|json, OUT/plots/   the comparison, rewritten after every run
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stablelora.benchmark.grid import (CompareConfig, CompareError, PlannedRun, merged_config, plan,
                                      planned_records, setting_label)
from stablelora.benchmark.results import write_results
from stablelora.eval import HIGHER_IS_BETTER, headline
from stablelora.fileio import write_atomic, write_json

RECORD_VERSION = 1


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_records(cfg: CompareConfig) -> dict[str, dict]:
    """Finished runs by id. A record made with other settings than the config now asks for is an error: mixing
    them would compare runs that differ in more than the method."""
    records = {}
    if not cfg.records_dir.is_dir():
        return records
    for path in sorted(cfg.records_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CompareError(f"{path} is not valid JSON ({err.msg}); delete it to re-run that run.") from err
        records[record["run_id"]] = record
    # re-plan with the records: seed and variant runs only become known once tuning has finished. A record the
    # plan does not name now (a value dropped from the config, or seed runs of a method whose grid was extended
    # and is being re-tuned) is kept: it counts again as soon as the plan names it.
    expected = {r.run_id: r for r in plan(cfg, records)}
    for run_id_, record in records.items():
        planned = expected.get(run_id_)
        if planned is None:
            continue
        if record["base_config_sha256"] != cfg.base_config_sha256 or record["overrides"] != _jsonable(planned.overrides):
            raise CompareError(
                f"{cfg.records_dir / (run_id_ + '.json')} was made with other settings than {cfg.path} now gives "
                f"this run (base config or overrides changed). Use a new output_dir for the new settings, or delete "
                f"{cfg.records_dir} to start this comparison over.")
    return records


def _jsonable(value):
    return json.loads(json.dumps(value))


def _metric_key(cfg: CompareConfig, metrics: dict) -> tuple[str, str]:
    if cfg.metric:
        eval_name, key = cfg.metric.split("/")
    else:
        eval_name = metrics["task"]
        key = headline(metrics["eval_after"][eval_name])[0]
        if HIGHER_IS_BETTER.get(key, cfg.higher_is_better) != cfg.higher_is_better:
            raise CompareError(f"{cfg.path}: the runs are judged by '{eval_name}/{key}', where "
                               f"{'higher' if HIGHER_IS_BETTER[key] else 'lower'} is better, but higher_is_better is "
                               f"{str(cfg.higher_is_better).lower()}. Name it, metric: {eval_name}/{key}, and "
                               "higher_is_better follows it.")
    if key not in metrics["eval_after"].get(eval_name, {}):
        available = [f"{e}/{k}" for e, r in metrics["eval_after"].items() for k, v in r.items()
                     if isinstance(v, (int, float))]
        raise CompareError(f"{cfg.path}: metric '{eval_name}/{key}' is not in the run's evaluation; choose one of "
                           f"{available}.")
    return eval_name, key


def _numeric(results: dict | None) -> dict:
    return {name: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for name, r in (results or {}).items()}


def _stops_by_module(status_path: Path) -> dict | None:
    if not status_path.exists():
        return None
    status = json.loads(status_path.read_text())
    by_module: dict[str, list] = {}
    for layer in status["per_layer"]:
        by_module.setdefault(layer["type"], []).append(layer["stop_step"])
    return {"layers": status["layers"], "stopped": status["stopped"], "stop_steps_by_module": by_module}


def _identity(run: PlannedRun) -> dict:
    """The fields that say which run a record is: first in every record."""
    return {"record_version": RECORD_VERSION, "run_id": run.run_id, "method": run.method, "role": run.role,
            "seed": run.seed, "setting": run.setting, "setting_label": setting_label(run.setting)}


def _provenance(cfg: CompareConfig, run: PlannedRun, run_dir: Path) -> dict:
    """The fields that say what made a record (checked when the records are loaded): last in every record."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"overrides": _jsonable(run.overrides), "base_config_sha256": cfg.base_config_sha256,
            "versions": config.get("versions"), "machine": machine()}


def make_record(cfg: CompareConfig, run: PlannedRun, run_dir: Path, duration: float) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    eval_name, key = _metric_key(cfg, metrics)
    validation = (metrics.get("eval_validation") or {}).get(eval_name, {}).get(key)
    return {
        **_identity(run),
        "metric": f"{eval_name}/{key}", "validation": validation, "test": metrics["eval_after"][eval_name][key],
        "eval_after": _numeric(metrics["eval_after"]), "eval_validation": _numeric(metrics.get("eval_validation")),
        "eval_before": _numeric(metrics["eval_before"]),
        "train_loss": metrics["train_loss"], "train_steps": metrics["train_steps"],
        "train_wall_seconds": metrics["train_wall_seconds"], "run_seconds": duration,
        "train_tokens": metrics["train_tokens"], "tokens_per_second": metrics["tokens_per_second"],
        "peak_memory_bytes": metrics.get("peak_memory_bytes"), "peak_memory_kind": metrics.get("peak_memory_kind"),
        "optimizer_state_bytes": metrics.get("optimizer_state_bytes"),
        "stable_lora": _stops_by_module(run_dir / "stable_lora_status.json"),
        "split": metrics["split"], "model": metrics["model"],
        **_provenance(cfg, run, run_dir),
    }


def make_diverged_record(cfg: CompareConfig, run: PlannedRun, run_dir: Path, duration: float) -> dict:
    """A run whose weights stopped being finite: kept as an outcome (the setting failed), never as a score."""
    diverged = json.loads((run_dir / "diverged.json").read_text())
    return {
        **_identity(run), "metric": cfg.metric,
        "diverged": {"step": diverged["step"], "message": diverged["message"]},
        "validation": None, "test": None, "train_loss": None, "run_seconds": duration,
        "split": diverged["split"], "model": diverged["model"],
        **_provenance(cfg, run, run_dir),
    }


def check_same_split(cfg: CompareConfig, records: dict[str, dict], record: dict) -> None:
    """Refuse a new run whose data split differs from the kept records' (same settings, but changed split code or
    data package): mixing them would compare methods on different examples, and no config check can see it."""
    other = next((r for r in records.values() if r["split"] != record["split"]), None)
    if other is not None:
        raise CompareError(
            f"run {record['run_id']} split the data differently from the kept record {other['run_id']} (the split "
            f"code or data package changed):\n  now:      {record['split']}\n  recorded: {other['split']}\n"
            f"Its record is not kept. Use a new output_dir, or delete {cfg.records_dir} to start this comparison over.")


def _die_with_parent() -> None:
    """In the child: ask Linux to kill it when the harness dies, so no run outlives its piece."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the harness still terminates the child on every exit path it controls


def execute(cfg: CompareConfig, run: PlannedRun) -> dict:
    """Train one run in a subprocess and return its record (written by the caller)."""
    run_dir = cfg.runs_dir / run.run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run killed in flight: start it over
    run_dir.mkdir(parents=True)
    config_path = run_dir / "grid_config.yaml"
    write_atomic(config_path, yaml.safe_dump(merged_config(cfg.base_config, run.overrides), sort_keys=False))
    shared_before = cfg.output_dir / "eval_before.json"
    command = [sys.executable, "-m", "stablelora.cli", "train", str(config_path), "training.disable_tqdm=true",
               "--output-dir", str(run_dir)]
    if shared_before.exists():
        command += ["--eval-before", str(shared_before)]
    log_path = run_dir / "train.log"
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            code = child.wait()
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
    duration = time.perf_counter() - started
    if code != 0 and (run_dir / "diverged.json").exists():
        return make_diverged_record(cfg, run, run_dir, duration)
    if code != 0:
        tail = log_path.read_text(errors="replace")[-2500:]
        raise CompareError(f"run {run.run_id} failed (exit {code}); its log is {log_path}. Last lines:\n{tail}\n"
                           "Fix the cause and run the same command again: finished runs are kept.")
    if not shared_before.exists():
        shutil.copyfile(run_dir / "eval_before.json", shared_before)
    return make_record(cfg, run, run_dir, duration)


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _expected_seconds(run: PlannedRun, records: dict[str, dict]) -> float | None:
    same = [r["run_seconds"] for r in records.values() if r["method"] == run.method]
    every = [r["run_seconds"] for r in records.values()]
    return statistics.median(same or every) if every else None


def run_grid(cfg: CompareConfig, *, time_budget_minutes: float | None = None, log=print) -> dict:
    """Run every pending run (or as many as fit the time budget) and keep the results current.

    Returns {"done": runs finished in total, "total": runs in the grid, "ran": runs finished by this call}.
    """
    records = load_records(cfg)
    total = cfg.total_runs()
    started = time.perf_counter()
    ran: list[float] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `timeout` and job schedulers send SIGTERM
    try:
        log(f"compare: {cfg.path} -> {cfg.output_dir} ({len(planned_records(cfg, records))} of {total} runs "
            "already done)")
        while True:
            named = plan(cfg, records)
            pending = [r for r in named if r.run_id not in records]
            if not pending:
                break
            run = pending[0]
            elapsed = time.perf_counter() - started
            expected = _expected_seconds(run, records)
            if time_budget_minutes is not None and expected is not None and \
                    elapsed + expected > time_budget_minutes * 60:
                log(f"time budget of {time_budget_minutes:g} min reached after {_fmt_duration(elapsed)}: the next run "
                    f"would take about {_fmt_duration(expected)}. Run the same command again to continue.")
                break
            finished = len(named) - len(pending)
            position, remaining = finished + 1, total - finished
            per_run = statistics.median(ran) if ran else expected
            eta = f", ETA {_fmt_duration(per_run * remaining)} for {remaining} runs" if per_run else ""
            log(f"[{position}/{total}] {run.method} ({run.role}) {setting_label(run.setting)} seed {run.seed}: "
                f"started, elapsed {_fmt_duration(elapsed)}{eta}")
            record = execute(cfg, run)
            check_same_split(cfg, records, record)
            write_json(cfg.records_dir / f"{run.run_id}.json", record)
            records[run.run_id] = record
            ran.append(record["run_seconds"])
            if record.get("diverged"):
                log(f"[{position}/{total}] DIVERGED by step {record['diverged']['step']} after "
                    f"{_fmt_duration(record['run_seconds'])}: recorded as a failed setting, not as a score")
            else:
                validation = f"validation {record['validation']:.4f}, " if record["validation"] is not None else ""
                log(f"[{position}/{total}] done in {_fmt_duration(record['run_seconds'])}: {validation}"
                    f"test {record['test']:.4f} ({record['metric']})")
            write_results(cfg, records)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if records:
        write_results(cfg, records)
    done = len(planned_records(cfg, records))
    log(f"compare: {done} of {total} runs done; results: {cfg.output_dir / 'results.md'}")
    return {"done": done, "total": total, "ran": len(ran)}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"Stopped by signal {signum}; the run in flight will be started over next time.")
