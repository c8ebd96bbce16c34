"""Resuming a run from its Trainer checkpoints: which checkpoints are finished, whether a resume may go on (not
after the end, not with changed settings, not from a damaged checkpoint), and finishing a run killed after its last
checkpoint without training a step more."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from stablelora.train.config import RunConfig
from stablelora.train.errors import RunError


def check_checkpoint(checkpoint: Path) -> None:
    """Read every file of a checkpoint before resuming from it, so a damaged one is named with the way out."""
    from safetensors.torch import load_file

    readers = {".json": lambda f: json.loads(f.read_text(encoding="utf-8")), ".safetensors": load_file,
               ".pt": lambda f: torch.load(f, map_location="cpu", weights_only=False),
               ".pth": lambda f: torch.load(f, map_location="cpu", weights_only=False)}
    for file in sorted(checkpoint.iterdir()):
        if file.is_file() and file.suffix in readers:
            try:
                readers[file.suffix](file)
            except Exception as err:  # noqa: BLE001 - any failure to read means the same: this file is damaged
                earlier = [p for p in finished_checkpoints(checkpoint.parent) if _step_of(p) < _step_of(checkpoint)]
                way_out = (f"Delete {checkpoint} and --resume again to continue from {earlier[-1].name}"
                           if earlier else "Start the run again without --resume (there is no earlier checkpoint)")
                raise RunError(f"--resume: checkpoint {checkpoint.name} is damaged: {file.name} cannot be read "
                               f"({type(err).__name__}: {str(err)[:200]}). {way_out}.") from err


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def finished_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints Trainer finished writing (trainer_state.json is written last), oldest first."""
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return sorted(done, key=_step_of)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    done = finished_checkpoints(checkpoint_dir)
    return done[-1] if done else None


# What a resumed run may change: how long it trains and how it logs and saves. Anything else (learning rate, method,
# data, model, seed, ...) is restored from the checkpoint by Trainer and the optimizer, so a change would be ignored
# while config.yaml claimed it.
RESUMABLE_KEYS = {"training.max_steps", "training.num_train_epochs", "training.save_steps", "training.save_total_limit",
                  "training.logging_steps", "training.disable_tqdm", "training.report_to", "training.output_dir"}


def check_resumable(cfg: RunConfig) -> None:
    """Refuse a resume of a finished run, or with settings that differ from the run's own config.yaml."""
    run_dir = cfg.run_dir
    if (run_dir / "metrics.json").exists():
        raise RunError(f"--resume: the run in {run_dir} has finished (metrics.json is written); there is nothing to "
                       "continue. Its results stay as they are; start a new run in another output directory.")
    if (run_dir / "diverged.json").exists():
        step = json.loads((run_dir / "diverged.json").read_text(encoding="utf-8"))["step"]
        raise RunError(f"--resume: the run in {run_dir} diverged by step {step} (diverged.json); with the same "
                       "settings it would diverge again, and they cannot change on a resume. Start a new run with a "
                       "lower training.learning_rate in another output directory.")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    changed = []
    for section in sorted((set(saved) | set(cfg.raw)) - {"versions"}):
        old, new = saved.get(section) or {}, cfg.raw.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if f"{section}.{key}" not in RESUMABLE_KEYS and old.get(key) != new.get(key):
                changed.append(f"{section}.{key}: {old.get(key)!r} in the run, {new.get(key)!r} now")
    if changed:
        raise RunError(f"--resume with settings that differ from the run's own ({saved_path}): " + "; ".join(changed)
                       + ". The checkpoint would restore the old values while config.yaml recorded the new ones. "
                       "Resume with the same config and overrides, or start a new run in another output directory.")


def reached_last_step(checkpoint: Path, max_steps: int) -> bool:
    """Whether the checkpoint is the run's last step (a run killed during its final evaluation or save)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    last = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return last > 0 and state.get("global_step", 0) >= last


def restore_finished_training(trainer, checkpoint: Path) -> None:
    """Load what the last checkpoint holds (adapter, optimizer with its Stable-LoRA state, Trainer state) without
    training: Trainer's own resume from the last step would train one step more."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights, optimizer = checkpoint / "adapter_model.safetensors", checkpoint / "optimizer.pt"
    if not weights.exists() or not optimizer.exists():
        raise RunError(f"--resume: {checkpoint} is the run's last step but holds no {weights.name} and "
                       f"{optimizer.name} to finish from (a sharded FSDP checkpoint?). Its adapter is in the checkpoint; "
                       "evaluate it with PeftModel.from_pretrained, or start the run again.")
    set_peft_model_state_dict(trainer.model, load_file(weights))
    trainer.create_optimizer()
    trainer.optimizer.load_state_dict(torch.load(optimizer, map_location="cpu", weights_only=True))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def train_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over the logged steps of a resumed run (Trainer's own figure covers only the steps after the
    resume). Each logged loss is the mean since the previous log, so it is weighted by its span."""
    total, covered, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            span = entry["step"] - previous
            total, covered, previous = total + entry["loss"] * span, covered + span, entry["step"]
    return total / covered if covered else None
