"""Never silently plain: a run that asked for Stable-LoRA stops unless Stable-LoRA is what trains.

Trainer, Accelerate and DeepSpeed each have a path that replaces or bypasses a user's optimizer without a word (a
DeepSpeed ``"optimizer"`` block, ``offload_optimizer``'s swap to DeepSpeedCPUAdam, a pre-built optimizer that
``deepspeed_init`` drops). ``StableLoRAGuard`` checks the outcome instead of each path: when training begins, the
optimizer Trainer steps must be a Stable-LoRA optimizer (through any wrappers), and by the end of the first step
that was not skipped, its shrink must have run. ``use_stable_lora(trainer)`` installs it with the factory, built
from the trainer's own ``TrainingArguments``; the ``StableLoRATrainerMixin`` and the ms-swift and axolotl plug-ins
install it through ``guard_stable_lora``.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from stablelora.optim.factory import StableLoRAOptimizerFactory, factory_kwargs_from_training_args
from stablelora.optim.stable import StableLoRAOptimizerMixin
from stablelora.optim.zero import check_zero_config


def deepspeed_config_of(args: Any) -> dict | None:
    """The DeepSpeed config a ``TrainingArguments`` will train with (None without DeepSpeed)."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    return None if hf_config is None else hf_config.config


def wrapped_chain(optimizer: Any) -> list[Any]:
    """The optimizer and everything it wraps (Accelerate's wrapper, DeepSpeed's ZeRO optimizer, ...)."""
    chain = [optimizer]
    while hasattr(chain[-1], "optimizer") and len(chain) < 8 and chain[-1].optimizer is not chain[-1]:
        chain.append(chain[-1].optimizer)
    return chain


class StableLoRAGuard(TrainerCallback):
    """Stops the run, naming the cause, if Stable-LoRA was asked for and is not what trains."""

    def __init__(self):
        self.optimizer: StableLoRAOptimizerMixin | None = None
        self.first_step_checked = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        chain = wrapped_chain(optimizer)
        found = [o for o in chain if isinstance(o, StableLoRAOptimizerMixin)]
        if found:
            self.optimizer = found[0]
            return
        config = deepspeed_config_of(args)
        if config is not None:
            check_zero_config(config)  # names the DeepSpeed setting that replaced the optimizer, if one did
        steps = " -> ".join(type(o).__name__ for o in chain)
        cause = ("under DeepSpeed, Trainer drops an optimizer passed as optimizers=(opt, ...) and builds its own: "
                 "build Stable-LoRA through Trainer instead, with use_stable_lora(trainer) or the "
                 "StableLoRAOptimizerFactory" if config is not None else
                 "something replaced the Stable-LoRA optimizer after it was built (a framework's own optimizer "
                 "setting, or a callback): build it where Trainer builds its optimizer")
        raise RuntimeError(f"Stable-LoRA was asked for, but the optimizer this Trainer steps is {steps}, not "
                           f"Stable-LoRA; training would be plain LoRA. Cause: {cause}.")

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.first_step_checked or self.optimizer is None:
            return
        if getattr(optimizer, "step_was_skipped", False):  # a GradScaler / fp16 overflow step: nothing ran
            return
        self.first_step_checked = True
        if not self.optimizer.shrink_has_run():
            raise RuntimeError(
                "Stable-LoRA was asked for, but its shrink did not run in the first optimizer step: the optimizer "
                "Trainer steps holds it, but something steps around it (a wrapper that calls another optimizer's "
                "step). Training would be plain LoRA; stopping.")


def guard_stable_lora(trainer: Trainer) -> None:
    """Refuse now the DeepSpeed settings under which Stable-LoRA would be replaced, and add the guard (once) that
    stops the run if anything else replaces it."""
    config = deepspeed_config_of(trainer.args)
    if config is not None:
        check_zero_config(config)
    if not any(isinstance(callback, StableLoRAGuard) for callback in trainer.callback_handler.callbacks):
        trainer.add_callback(StableLoRAGuard())


def use_stable_lora(trainer: Trainer, *, shrink_ratio: float = 5e-4, stop_rule: bool = True) -> Trainer:
    """Make ``trainer`` train with Stable-LoRA over the optimizer its ``TrainingArguments`` ask for.

    The base optimizer, learning rate, betas, eps and weight decay are the trainer's own (``optim``,
    ``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``, ``optim_args``), so moving to
    Stable-LoRA changes nothing else. Settings that cannot be carried over are refused here, before training, and
    the ``StableLoRAGuard`` stops the run if anything later replaces the optimizer.
    """
    if trainer.optimizer is not None:
        raise ValueError("use_stable_lora: this Trainer was given a pre-built optimizer (optimizers=(opt, ...)); "
                         "use_stable_lora builds the optimizer where Trainer builds its own. Drop the optimizer.")
    if trainer.optimizer_cls_and_kwargs is not None:
        chosen = trainer.optimizer_cls_and_kwargs[0]
        raise ValueError(f"use_stable_lora: this Trainer already has optimizer_cls_and_kwargs (optimizer "
                         f"{getattr(chosen, '__name__', chosen)!r}, set by you or a framework); replacing it would "
                         "silently drop that choice. Remove it and set the base optimizer in TrainingArguments.optim.")
    if getattr(trainer.args, "embedding_learning_rate", None) is not None:
        raise ValueError("use_stable_lora: embedding_learning_rate is set, and with it unsloth's UnslothTrainer builds "
                         "its own optimizer and never calls optimizer_cls_and_kwargs: Stable-LoRA would not train. "
                         "Unset embedding_learning_rate (the embeddings then train at learning_rate).")
    guard_stable_lora(trainer)
    kwargs = factory_kwargs_from_training_args(trainer.args, trainer.model)
    trainer.optimizer_cls_and_kwargs = (StableLoRAOptimizerFactory,
                                        {**kwargs, "shrink_ratio": shrink_ratio, "stop_rule": stop_rule})
    return trainer
