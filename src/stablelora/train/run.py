"""One training run, from a RunConfig to a run directory (the contract every later stage reads).

RUN/config.yaml          resolved config, with versions
RUN/eval_before.json     evaluation of the untrained adapter (B = 0: the base model)
RUN/metrics.json         eval before/after, train loss, wall time, tokens/s, Stable-LoRA stop summary
RUN/stable_lora_status.json   per-layer shrink status (Stable-LoRA runs)
RUN/monitor.jsonl        per-step, per-layer stability diagnostics (StabilityMonitor)
RUN/log_history.json     Trainer's log (training loss, learning rate, ...) for reports
RUN/adapter/             adapter_model.safetensors + adapter_config.json (PeftModel.from_pretrained)
RUN/checkpoints/         Trainer checkpoints (optimizer state includes the Stable-LoRA flags)
RUN/tb/                  TensorBoard events
Every file is written to a temporary name and renamed, so a killed run never leaves one that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from stablelora.assets.models import model_kind, resolve_model
from stablelora.assets.tasks import TaskData
from stablelora.diagnostics.monitor import StabilityMonitor, module_type
from stablelora.fileio import claimed_directory, write_atomic, write_json
from stablelora.methods import ADAPTER_OPTIONS
from stablelora.train.checkpoints import (check_checkpoint, check_resumable, latest_checkpoint, reached_last_step,
                                          restore_finished_training, train_loss)
from stablelora.train.config import RunConfig
from stablelora.train.data import ListDataset, check_fits_task, collator, load_task_data, train_items
from stablelora.train.errors import RunDiverged, RunError
from stablelora.train.evaluate import eval_splits, evaluate
from stablelora.train.model import (build_peft_model, check_targets, gather_trainable, save_adapter,
                                    save_initial_adapter)
from stablelora.train.trainer import (DivergenceGuard, GracefulInterrupt, StableLoRATrainer, TrainingDiverged,
                                     unwrap_optimizer)


def stop_summary(optimizer) -> dict | None:
    status = getattr(optimizer, "stable_lora_status", None)
    if status is None:
        return None
    layers = status()
    stops = [s.stop_step for s in layers if s.stop_step is not None]
    return {
        "layers": len(layers),
        "stopped": len(stops),
        "median_stop_step": statistics.median(stops) if stops else None,
        "first_stop_step": min(stops) if stops else None,
        "last_stop_step": max(stops) if stops else None,
        "per_layer": [{"name": s.name, "type": module_type(s.module), "in": s.in_features, "out": s.out_features,
                       "stop_step": s.stop_step} for s in layers],
    }


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of tensors in the optimizer's state (moments, preconditioners, Stable-LoRA flags), this process."""
    total = 0
    for entry in optimizer.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))
    return total


def peak_memory() -> dict:
    """Peak accelerator memory torch allocated since the last reset, or on CPU the process's peak resident set size
    (which includes loading the model and the evaluation before training)."""
    if torch.cuda.is_available():
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "cuda max allocated"}
    import resource

    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process max RSS"}


def versions() -> dict:
    import peft
    import transformers

    import stablelora

    return {"stablelora": stablelora.__version__, "torch": str(torch.__version__), "transformers": transformers.__version__,
            "peft": peft.__version__}


# What a run writes into its directory (besides checkpoints/): cleared when a new run starts where one failed to.
RUN_FILES = ("config.yaml", "eval_before.json", "metrics.json", "diverged.json", "monitor.jsonl",
             "log_history.json", "stable_lora_status.json", "adapter", "adapter_init", "tb")


def remove_failed_start(run_dir: Path) -> None:
    """A new run where an earlier one failed before its first checkpoint: its files must not mix with this run's.
    Only called on a directory stablelora made (``claimed_directory(only_ours=True)``), and only on its own names."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@dataclass
class LoadedRun:
    """What the steps of a run share once the model and data are loaded."""

    task: TaskData
    kind: str  # CAUSAL or ENCODER (stablelora.assets.models)
    tokenizer: Any
    train_items: list[dict]
    collate: Callable[[list[dict]], dict]
    model: Any
    init_dir: Path | None  # the adapter before training, for inits that rewrite W0 (saving converts against it)


def open_run_directory(cfg: RunConfig, resume: bool, main_process: bool) -> Path | None:
    """Refuse a clash with an earlier run, check what a resume needs, write config.yaml; returns the checkpoint to
    resume from."""
    run_dir = cfg.run_dir
    checkpoints = Path(cfg.training.output_dir)
    if not resume and (checkpoints.exists() and any(checkpoints.iterdir()) or (run_dir / "metrics.json").exists()):
        raise RunError(f"Run directory {run_dir} already holds a run. Continue it with --resume, or choose another "
                       "output directory (--output-dir / training.output_dir).")
    resume_from = latest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        raise RunError(f"--resume: no finished checkpoint in {checkpoints}. Start the run without --resume.")
    if resume:
        check_resumable(cfg)
        check_checkpoint(resume_from)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if main_process:
            if not resume:
                remove_failed_start(run_dir)
            write_atomic(run_dir / "config.yaml", yaml.safe_dump({**cfg.raw, "versions": versions()}, sort_keys=False))
    except OSError as err:
        raise RunError(f"Cannot write the run directory {run_dir}: {err.strerror or err}. Choose a directory you can "
                       "write to (--output-dir / training.output_dir).") from err
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tb")
    return resume_from


def load_run(cfg: RunConfig, main_process: bool) -> LoadedRun:
    """Seed, then the tokenizer, the task's splits and the base model with its adapter."""
    from transformers import AutoTokenizer, set_seed

    set_seed(cfg.training.seed)
    model_dir = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kind = model_kind(model_dir)
    task = load_task_data(cfg)
    check_fits_task(cfg, task, kind)
    items = train_items(kind, task.family, tokenizer, task.train, cfg.data.max_length)
    collate = collator(kind, task.family, tokenizer, cfg.data.max_length)
    check_targets(cfg, kind, task.family, model_dir)  # from the architecture, before any weight loads
    model = build_peft_model(cfg, kind, task, model_dir, items, collate)
    init_dir = None
    if any(ADAPTER_OPTIONS[o].mutates_base for o in cfg.method.adapter):
        init_dir = cfg.run_dir / "adapter_init"
        if main_process and not init_dir.exists():
            save_initial_adapter(model, init_dir)
    return LoadedRun(task, kind, tokenizer, items, collate, model, init_dir)


def check_given_evaluation(given: dict, run: LoadedRun, source: str) -> None:
    """An evaluation made elsewhere (--eval-before) must be of this task's eval sets, at their sizes: one of another
    task would fail after training, one of another eval size would be compared with scores of other examples."""
    expected = {name: len(split) for name, split in eval_splits(run.task, run.kind).items()}
    found = {name: result.get("examples") if isinstance(result, dict) else None for name, result in given.items()} \
        if isinstance(given, dict) else {}
    if found != expected:
        raise RunError(f"{source} is not an evaluation of this run's eval sets: it holds {found or given!r} "
                       f"(eval set: examples), this run evaluates {expected}. Give the eval_before.json of a run of "
                       "the same model, task and data settings, or leave --eval-before out to evaluate here.")


def evaluate_before(cfg: RunConfig, run: LoadedRun, given: dict | None, resume: bool, main_process: bool) -> dict:
    """The evaluation of the untrained adapter: given (compare shares one), kept from the interrupted run, or made."""
    path = cfg.run_dir / "eval_before.json"
    if given is not None:
        check_given_evaluation(given, run, "--eval-before")
    result = given
    if result is None and resume and path.exists():
        result = json.loads(path.read_text())
    if result is None:
        run.model.to(cfg.training.device)  # where Trainer will train it: a GPU evaluates in seconds, not minutes
        result = evaluate(run.model, run.task, run.kind, run.tokenizer, cfg.data)
    if main_process:
        write_json(path, result)
    return result


def make_trainer(cfg: RunConfig, run: LoadedRun, main_process: bool) -> tuple[StableLoRATrainer, GracefulInterrupt]:
    interrupt = GracefulInterrupt()
    callbacks = [interrupt, DivergenceGuard(run.model)]
    if cfg.monitor.enabled:
        probe = run.collate(run.train_items[: cfg.monitor.probe_examples])
        callbacks.append(StabilityMonitor(run.model, probe, every=cfg.monitor.every,
                                          output_dir=cfg.run_dir if main_process else None, tensorboard=True))
    trainer = StableLoRATrainer(model=run.model, args=cfg.training, train_dataset=ListDataset(run.train_items),
                                data_collator=run.collate, method=cfg.method, callbacks=callbacks)
    return trainer, interrupt


def train(cfg: RunConfig, run: LoadedRun, trainer: StableLoRATrainer, resume_from: Path | None,
          main_process: bool) -> tuple[float | None, float, dict]:
    """Train (or restore a run killed after its last checkpoint); returns the train loss, wall seconds and the
    memory peak. A diverged run leaves diverged.json and its log, and nothing that looks like a result."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak of training, not of loading or the first evaluation
    started = time.perf_counter()
    if resume_from is not None and reached_last_step(resume_from, cfg.training.max_steps):
        restore_finished_training(trainer, resume_from)  # killed after its last checkpoint: do not train again
        loss = train_loss(trainer.state.log_history)
    else:
        try:
            loss = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).training_loss
        except TrainingDiverged as err:
            if main_process:
                write_json(cfg.run_dir / "diverged.json", {"step": err.step, "message": str(err),
                                                           "split": run.task.split_note,
                                                           "model": cfg.model.name_or_path})
                write_json(cfg.run_dir / "log_history.json", trainer.state.log_history)
            raise RunDiverged(str(err)) from err
        if resume_from is not None:  # Trainer's figure covers only the steps after the resume
            loss = train_loss(trainer.state.log_history)
    return loss, time.perf_counter() - started, peak_memory()


def save_outputs(cfg: RunConfig, run: LoadedRun, trainer: StableLoRATrainer, main_process: bool) -> dict | None:
    """The log, the adapter and the Stable-LoRA stop summary (returned), saved before the evaluation after training
    so that a failed evaluation loses no training."""
    summary = stop_summary(unwrap_optimizer(trainer.optimizer))
    gathered = gather_trainable(run.model)  # FSDP2: every rank takes part
    if main_process:
        write_json(cfg.run_dir / "log_history.json", trainer.state.log_history)
        save_adapter(run.model, cfg.run_dir / "adapter", run.init_dir, gathered)
        if summary is not None:
            write_json(cfg.run_dir / "stable_lora_status.json", summary)
    return summary


def run_training(cfg: RunConfig, *, resume: bool = False, eval_before: dict | None = None) -> dict:
    """Train and evaluate one configuration; returns the metrics written to RUN/metrics.json.

    Under torchrun / accelerate launch every rank runs this function; only the main process writes files.
    """
    main_process = int(os.environ.get("RANK", "0")) == 0
    with claimed_directory(cfg.run_dir, "run directory", only_ours=not resume) if main_process else contextlib.nullcontext():
        return _run_training(cfg, resume, eval_before, main_process)


def _run_training(cfg: RunConfig, resume: bool, eval_before: dict | None, main_process: bool) -> dict:
    resume_from = open_run_directory(cfg, resume, main_process)
    run = load_run(cfg, main_process)
    eval_before = evaluate_before(cfg, run, eval_before, resume, main_process)
    trainer, interrupt = make_trainer(cfg, run, main_process)
    loss, wall, memory = train(cfg, run, trainer, resume_from, main_process)
    if interrupt.requested:
        raise KeyboardInterrupt(f"Interrupted: checkpoint saved under {cfg.training.output_dir}; continue with "
                                "--resume.")
    summary = save_outputs(cfg, run, trainer, main_process)
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "task": run.task.name,
        "split": run.task.split_note,
        "model": cfg.model.name_or_path,
        "method": {"optimizer": cfg.method.optimizer, "adapter": cfg.method.adapter},
        "seed": cfg.training.seed,
        "eval_before": eval_before,
        "eval_after": evaluate(run.model, run.task, run.kind, run.tokenizer, cfg.data),
        "eval_validation": evaluate(run.model, run.task, run.kind, run.tokenizer, cfg.data, validation=True)
        if run.task.validation else None,
        "train_loss": loss,
        "train_steps": trainer.state.global_step,
        "train_wall_seconds": wall,
        "train_tokens": tokens,
        "tokens_per_second": tokens / wall if tokens else None,
        "optimizer_state_bytes": optimizer_state_bytes(unwrap_optimizer(trainer.optimizer)),
        **memory,
        "resumed_from": str(resume_from) if resume_from else None,
        "stable_lora": {k: v for k, v in summary.items() if k != "per_layer"} if summary else None,
    }
    if main_process:
        write_json(cfg.run_dir / "metrics.json", metrics)
    return metrics
