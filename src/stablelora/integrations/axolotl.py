"""Stable-LoRA in axolotl, as a plugin named in the training YAML::

    plugins:
      - stablelora.integrations.axolotl.StableLoRAPlugin
    stable_lora_shrink_ratio: 0.0005   # λ (default 5e-4)
    stable_lora_stop_rule: true        # stop shrinking a layer for good once ‖A‖/in < ‖B‖/out (default true)

axolotl's ``create_optimizer`` plugin hook is never called (axolotl #2576), so the plugin installs the optimizer in
``post_trainer_create``: it sets the trainer's ``optimizer_cls_and_kwargs`` to a factory, which axolotl's trainer
calls as ``factory()(model, training_args, **kwargs)`` where it would build its own optimizer. The base optimizer is
axolotl's own choice (``optimizer:``, ``learning_rate``, betas, eps, ``weight_decay``, ``optim_args``): one that
transformers builds (``adamw_torch``, ``sgd``, ...), or one of axolotl's own optimizer classes (``adopt_adamw``,
``came_pytorch``, ``optimi_adamw``, ...), which Stable-LoRA wraps. axolotl's optimizers that come from a factory of
their own (``muon``, ``dion``) are refused. Under ``deepspeed:`` the plugin refuses the settings that would replace
Stable-LoRA (an ``"optimizer"`` block, ``offload_optimizer``) in ``post_trainer_create``; that path was not run
(axolotl starts DeepSpeed with NCCL when it reads its config, which needs a GPU).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field
from torch import nn
from torch.optim import Optimizer

from stablelora.optim.factory import PARAMETER_REWRITING_KEYS, StableLoRAOptimizerFactory, create_from_training_args
from stablelora.train.guard import guard_stable_lora


class StableLoRAArgs(BaseModel):
    """The plugin's keys in the axolotl YAML."""

    stable_lora_shrink_ratio: float = Field(default=5e-4, gt=0.0, lt=1.0)
    stable_lora_stop_rule: bool = True


class _StableLoRAOverAxolotlsChoice:
    """axolotl calls an optimizer factory as ``factory()(model, training_args, **kwargs)``. ``base`` is the optimizer
    class and kwargs axolotl chose itself, if it did; otherwise the base is what ``training_args`` ask for."""

    def __call__(self, model: nn.Module, training_args: Any, *, base: dict[str, Any] | None, shrink_ratio: float,
                 stop_rule: bool) -> Optimizer:
        if base is None:
            return create_from_training_args(model, training_args, shrink_ratio=shrink_ratio, stop_rule=stop_rule)
        return StableLoRAOptimizerFactory()(model, shrink_ratio=shrink_ratio, stop_rule=stop_rule, **base)


def _axolotls_optimizer(cfg, trainer) -> dict[str, Any] | None:
    """The optimizer class and kwargs axolotl set for its own optimizers (None when transformers builds it)."""
    if trainer.optimizer_cls_and_kwargs is None:
        return None
    optimizer_cls, kwargs = trainer.optimizer_cls_and_kwargs
    if any(key in kwargs for key in PARAMETER_REWRITING_KEYS):
        raise ValueError(f"StableLoRAPlugin cannot wrap optimizer: {cfg.optimizer}: it builds its own parameter "
                         "groups, which would replace the LoRA factors Stable-LoRA shrinks. Choose an optimizer that "
                         "steps the model's parameters (adamw_torch, adopt_adamw, came_pytorch, ...).")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise ValueError(f"StableLoRAPlugin cannot wrap optimizer: {cfg.optimizer}: axolotl builds it with a factory "
                         f"of its own ({getattr(optimizer_cls, '__name__', optimizer_cls)}), not an optimizer class, "
                         "so Stable-LoRA would replace it. Choose an optimizer class (adamw_torch, adopt_adamw, "
                         "came_pytorch, ...) or remove the plugin.")
    if "lr" not in kwargs:
        raise ValueError(f"StableLoRAPlugin: axolotl gave optimizer: {cfg.optimizer} no learning rate; set "
                         "learning_rate.")
    return {"optimizer_cls": optimizer_cls, **kwargs}


class StableLoRAPlugin(BasePlugin):
    def get_input_args(self) -> str:
        return "stablelora.integrations.axolotl.StableLoRAArgs"

    def post_trainer_create(self, cfg, trainer) -> None:
        if cfg.adapter not in ("lora", "qlora"):
            raise ValueError(f"StableLoRAPlugin needs a LoRA adapter (adapter: lora or qlora), got adapter: "
                             f"{cfg.adapter!r}: Stable-LoRA shrinks the LoRA A matrices.")
        for setting in ("loraplus_lr_ratio", "embedding_lr", "embedding_lr_scale", "lr_groups"):
            if cfg.get(setting) is not None:
                raise ValueError(f"StableLoRAPlugin cannot be combined with {setting}: axolotl would build the "
                                 f"Stable-LoRA optimizer and silently drop {setting}. Remove {setting} or the plugin.")
        base = _axolotls_optimizer(cfg, trainer)
        guard_stable_lora(trainer)
        trainer.optimizer_cls_and_kwargs = (_StableLoRAOverAxolotlsChoice, {
            "base": base, "shrink_ratio": cfg.stable_lora_shrink_ratio, "stop_rule": cfg.stable_lora_stop_rule})
