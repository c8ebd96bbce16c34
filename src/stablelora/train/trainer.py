"""HF Trainer integration: the optimizer is built in ``create_optimizer`` from the method registry.

Building it there (not passing ``optimizers=(opt, None)``) means it is created from the model Trainer actually
trains, after Accelerate has wrapped it for DDP/FSDP; Trainer refuses a pre-built optimizer under FSDP and silently
replaces it under DeepSpeed (which ``StableLoRAGuard``, installed for stable-lora, turns into an error).
``StableLoRATrainerMixin`` works with any Trainer subclass, e.g. TRL's ``SFTTrainer``:

    class MySFTTrainer(StableLoRATrainerMixin, SFTTrainer): ...
    trainer = MySFTTrainer(model=..., args=..., method=MethodArguments(optimizer="stable-lora"), ...)
"""

from __future__ import annotations

import signal
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from stablelora.methods import MethodArguments, build_optimizer
from stablelora.optim.distributed import DEEPSPEED_MESSAGE, FSDP_PAIRING_MESSAGE, all_ranks_min, local_tensor
from stablelora.train.guard import deepspeed_config_of, guard_stable_lora, wrapped_chain


def unwrap_optimizer(optimizer):
    """The optimizer itself, from inside Accelerate's wrapper (and DeepSpeed's ZeRO optimizer) if there are any."""
    return wrapped_chain(optimizer)[-1]


class StableLoRATrainerMixin:
    """Mix in front of ``transformers.Trainer`` (or a subclass) to train with a registry method."""

    def __init__(self, *args: Any, method: MethodArguments | None = None, **kwargs: Any):
        self.method = method or MethodArguments()
        super().__init__(*args, **kwargs)
        if self.method.optimizer == "stable-lora":
            guard_stable_lora(self)

    def create_optimizer(self, model=None):  # noqa: D401 - Trainer API
        config = deepspeed_config_of(self.args)
        if config is not None and self.method.optimizer in ("lora-rite", "riemannian"):
            raise ValueError(f"method.optimizer={self.method.optimizer} under DeepSpeed ZeRO: {DEEPSPEED_MESSAGE}")
        if self.is_fsdp_enabled and self.method.optimizer in ("lora-rite", "riemannian"):
            raise ValueError(f"method.optimizer={self.method.optimizer} under FSDP: {FSDP_PAIRING_MESSAGE}")
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay_names = set(self.get_decay_parameter_names(opt_model))
            trainable = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in trainable if n in decay_names], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in trainable if n not in decay_names], "weight_decay": 0.0},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = build_optimizer(opt_model, self.method, optimizer_cls, optimizer_kwargs,
                                             [g for g in groups if g["params"]], self.args.weight_decay)
        return self.optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        status = getattr(unwrap_optimizer(self.optimizer), "stable_lora_status", None)
        if status is not None:  # one host read per logging step, never per training step
            layers = status()
            logs["stable_lora/shrinking_fraction"] = sum(s.shrinking for s in layers) / len(layers)
        super().log(logs, *args, **kwargs)


class StableLoRATrainer(StableLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` whose optimizer comes from ``method`` (see stablelora.methods)."""


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop cleanly. Second Ctrl-C: abort at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nInterrupted: saving a checkpoint after this step, then stopping (Ctrl-C again to abort now).",
              flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class TrainingDiverged(RuntimeError):
    """Weights stopped being finite; ``step`` is the step at which the guard saw it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class DivergenceGuard(TrainerCallback):
    """Stops a run whose trainable weights are no longer finite, before it logs or saves them.

    A NaN/inf loss gives non-finite gradients and then weights (unless a GradScaler skips that step, which is no
    divergence), so the weights are the one signal that holds; Trainer's logged loss cannot be trusted here, as it
    replaces non-finite values by the running mean. Checked on every step that logs or saves and on the last one
    (one host read each), so every checkpoint that exists is finite.
    """

    def __init__(self, model):
        self.model = model
        self.last_finite_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_log or state.global_step >= state.max_steps:
            self.check(state.global_step, args.learning_rate)

    @torch.no_grad()
    def check(self, step: int, learning_rate: float) -> None:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        finite = [torch.isfinite(local_tensor(p)).all() for _, p in named]
        # every rank must stop together (FSDP2 shards differ)
        flags = all_ranks_min(torch.stack(finite).to(torch.int32) if finite else torch.ones(0, dtype=torch.int32))
        if bool(flags.all()):
            self.last_finite_step = step
            return
        bad = [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
        raise TrainingDiverged(
            f"training diverged by step {step}: {len(bad)} trainable weight tensor(s) are no longer finite (NaN or "
            f"inf), e.g. {bad[0]}. The likely cause is a learning rate too high for this model "
            f"(training.learning_rate={learning_rate:g}); start a new run with a lower one, or with warmup_steps or "
            f"max_grad_norm. Nothing was saved after step {self.last_finite_step}, the last step checked finite.",
            step)
