"""Stable-LoRA in axolotl, as a plugin named in the training YAML::

    plugins:
      - stablelora.integrations.axolotl.StableLoRAPlugin
    stable_lora_shrink_ratio: 0.0005   # λ (default 5e-4)
    stable_lora_stop_rule: true        # stop shrinking a layer for good once ‖A‖/in <= ‖B‖/out (default true)

axolotl's ``create_optimizer`` plugin hook is never called (axolotl #2576), so the plugin installs the optimizer in
``post_trainer_create``, which is: it sets the trainer's ``optimizer_cls_and_kwargs`` to a factory, and axolotl's
trainer builds the optimizer from it where it would build its own. The base optimizer, learning rate, betas, eps and
weight decay are axolotl's own settings (``optimizer: adamw_torch``, ``learning_rate``, ...).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field
from torch import nn
from torch.optim import Optimizer

from stablelora.optim.factory import create_from_training_args


class StableLoRAArgs(BaseModel):
    """The plugin's keys in the axolotl YAML."""

    stable_lora_shrink_ratio: float = Field(default=5e-4, gt=0.0, lt=1.0)
    stable_lora_stop_rule: bool = True


class _FromTrainingArgs:
    """axolotl calls an optimizer factory as ``factory()(model, training_args, **kwargs)``."""

    def __call__(self, model: nn.Module, training_args: Any, *, shrink_ratio: float, stop_rule: bool) -> Optimizer:
        return create_from_training_args(model, training_args, shrink_ratio=shrink_ratio, stop_rule=stop_rule)


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
        trainer.optimizer_cls_and_kwargs = (_FromTrainingArgs, {"shrink_ratio": cfg.stable_lora_shrink_ratio,
                                                                "stop_rule": cfg.stable_lora_stop_rule})
