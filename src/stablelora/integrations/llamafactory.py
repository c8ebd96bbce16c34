"""Stable-LoRA in LLaMA-Factory's v1 trainer, through its optimizer registry.

The v1 trainer builds its optimizer as ``OptimizerPlugin(optim_config.name)(model, optim_config)``. The registry
lives in the process, so this module registers ``stable_lora`` when imported, and its ``__main__`` starts LLaMA-Factory's
v1 launcher after that; use it where you would use ``llamafactory-cli`` (``torchrun ... -m`` as well)::

    python -m stablelora.integrations.llamafactory sft my_sft.yaml

    # my_sft.yaml, beside the usual model, peft_config and train_dataset keys:
    optim_config:
      name: stable_lora
      lr: 1.0e-4             # required: v1 passes only optim_config to the optimizer, not learning_rate
      shrink_ratio: 5.0e-4   # λ
      weight_decay: 0.0      # and any keyword of the base optimizer (default torch.optim.AdamW): betas, eps, ...

Under v1's ``dist_config: {name: deepspeed, config_file: ...}`` the optimizer is built after Accelerate has taken the
DeepSpeed config, and goes through Accelerate's DeepSpeed path (ZeRO shrinks the fp32 masters); the factory refuses
the settings that would replace it there (``offload_optimizer``, ``round_robin_gradients``) when it builds.
LLaMA-Factory's classic trainer (without ``USE_V1=1``) hard-codes its optimizer choices and has no such registry.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from stablelora.optim.factory import StableLoRAOptimizerFactory


def create_stable_lora_optimizer(model: nn.Module, optim_config: dict[str, Any]) -> Optimizer:
    """The ``stable_lora`` entry of the v1 optimizer registry."""
    settings = {key: value for key, value in dict(optim_config).items() if key != "name"}
    if "lr" not in settings:
        raise ValueError("optim_config with name: stable_lora needs lr (e.g. lr: 1.0e-4): LLaMA-Factory's v1 trainer "
                         "passes only optim_config to the optimizer, not learning_rate.")
    return StableLoRAOptimizerFactory()(model, **settings)  # optimizer_cls: "SGD" in YAML, AdamW when not given


def register() -> None:
    from llamafactory.v1.plugins.trainer_plugins.optimizer import OptimizerPlugin

    OptimizerPlugin("stable_lora").register()(create_stable_lora_optimizer)


register()

if __name__ == "__main__":
    from llamafactory.v1.launcher import main

    main()
