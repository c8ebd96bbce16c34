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
import shutil
import signal
import statistics
import subprocess
import sys
import time

import yaml

from stablelora.benchmark.grid import (CompareConfig, CompareError, PlannedRun, merged_config, plan, planned_records,
                                      setting_label)
from stablelora.benchmark.records import (check_same_split, load_records, make_diverged_record, make_record,
                                          write_record)
from stablelora.benchmark.render import write_results
from stablelora.fileio import claimed_directory, made_by_stablelora, mark_made_by_stablelora, write_atomic


def _die_with_parent() -> None:
    """In the child: ask Linux to kill it when the harness dies, so no run outlives its piece."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the harness still terminates the child on every exit path it controls


def execute(cfg: CompareConfig, run: PlannedRun) -> dict:
    """Train one run in a subprocess and return its record (written by the caller)."""
    run_dir = cfg.runs_dir / run.run_id
    if run_dir.exists():  # a run killed in flight: start it over, if it is one (compare wrote grid_config.yaml)
        if not (made_by_stablelora(run_dir) or (run_dir / "grid_config.yaml").exists()):
            raise CompareError(f"{run_dir} holds files that compare did not write; it would delete them to start "
                               f"run {run.run_id} there. Move them away, or use another --output-dir.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    mark_made_by_stablelora(run_dir)
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


def _expected_seconds(run: PlannedRun, records: dict[str, dict], finished_here: list[dict]) -> float | None:
    """The median duration of like runs: those this call finished (this machine, this load) once there are any,
    else the records, which may come from another machine; a run of the same method if there is one."""
    pool = finished_here or list(records.values())
    same = [r["run_seconds"] for r in pool if r["method"] == run.method]
    every = [r["run_seconds"] for r in pool]
    return statistics.median(same or every) if every else None


def run_grid(cfg: CompareConfig, *, time_budget_minutes: float | None = None, log=print) -> dict:
    """Run every pending run (or as many as fit the time budget) and keep the results current; one compare at a
    time per output directory (a second one would restart the first's run in flight).

    Returns {"done": runs finished in total, "total": runs in the grid, "ran": runs finished by this call}.
    """
    with claimed_directory(cfg.output_dir, "compare directory", only_ours=False):
        return _run_grid(cfg, time_budget_minutes, log)


def _run_grid(cfg: CompareConfig, time_budget_minutes: float | None, log) -> dict:
    records = load_records(cfg)
    total = cfg.total_runs()
    started = time.perf_counter()
    ran: list[dict] = []  # the records this call made
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
            expected = _expected_seconds(run, records, ran)
            if time_budget_minutes is not None and expected is not None and \
                    elapsed + expected > time_budget_minutes * 60:
                log(f"time budget of {time_budget_minutes:g} min reached after {_fmt_duration(elapsed)}: the next run "
                    f"would take about {_fmt_duration(expected)}. Run the same command again to continue.")
                break
            finished = len(named) - len(pending)
            position, remaining = finished + 1, total - finished
            per_run = statistics.median([r["run_seconds"] for r in ran]) if ran else expected
            eta = f", ETA {_fmt_duration(per_run * remaining)} for {remaining} runs" if per_run else ""
            log(f"[{position}/{total}] {run.method} ({run.role}) {setting_label(run.setting)} seed {run.seed}: "
                f"started, elapsed {_fmt_duration(elapsed)}{eta}")
            record = execute(cfg, run)
            check_same_split(cfg, records, record)
            write_record(cfg, record)
            records[run.run_id] = record
            ran.append(record)
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
