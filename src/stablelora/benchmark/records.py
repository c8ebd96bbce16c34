"""Records: one small JSON file per finished run, the only thing the run stage hands to aggregation.

A record holds the run's identity (method, setting, seed), its scores and costs from RUN/metrics.json, its
Stable-LoRA stop steps by module type, and its provenance (base config hash, overrides, versions, machine), which
is checked when the records are loaded so that runs made with other settings are never mixed.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import yaml

from stablelora.benchmark.grid import CompareConfig, CompareError, PlannedRun, plan, setting_label
from stablelora.eval import HIGHER_IS_BETTER, headline
from stablelora.fileio import write_json

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


def metric_key(cfg: CompareConfig, metrics: dict) -> tuple[str, str]:
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
    eval_name, key = metric_key(cfg, metrics)
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


def write_record(cfg: CompareConfig, record: dict) -> None:
    """Atomically, after the run's metrics are on disk: a record that exists is a finished run."""
    write_json(cfg.records_dir / f"{record['run_id']}.json", record)
