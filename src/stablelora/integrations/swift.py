"""Stable-LoRA in ms-swift: ``swift sft --external_plugins my_plugin.py --optimizer stable_lora ...``.

ms-swift builds its optimizer through ``optimizers_map[args.optimizer](args, trainer)`` (``swift/optimizers``), and
``--external_plugins`` imports a user's file before training. That file calls :func:`register`::

    # my_plugin.py
    from stablelora.integrations.swift import register
    register(shrink_ratio=5e-4)      # adds --optimizer stable_lora

The base optimizer, learning rate, betas, eps and weight decay come from swift's own arguments (``--optim``,
``--learning_rate``, ...), exactly as for its default optimizer; the learning-rate schedule is swift's. Under
``--deepspeed`` (ZeRO-1/2/3) Stable-LoRA shrinks DeepSpeed's fp32 masters; the DeepSpeed settings that would
replace it (an ``"optimizer"`` block, ``offload_optimizer`` as in swift's ``zero2_offload``) are refused when the
trainer is built, and ``StableLoRAGuard`` stops a run in which anything else replaced it.
"""

from __future__ import annotations

from torch.optim import Optimizer

from stablelora.optim.factory import create_from_training_args
from stablelora.optim.zero import check_zero_config
from stablelora.train.guard import deepspeed_config_of, guard_stable_lora


def register(name: str = "stable_lora", *, shrink_ratio: float = 5e-4, stop_rule: bool = True) -> None:
    """Make ``--optimizer <name>`` build a Stable-LoRA optimizer with these settings."""
    from swift.optimizers import OptimizerCallback, optimizers_map

    class StableLoRAOptimizerCallback(OptimizerCallback):
        def __init__(self, args, trainer):
            super().__init__(args, trainer)
            config = deepspeed_config_of(args)
            if config is not None:  # now: with a DeepSpeed "optimizer" block, create_optimizer is never called
                check_zero_config(config)

        def create_optimizer(self, model=None) -> Optimizer:
            guard_stable_lora(self.trainer)
            model = self.trainer.model if model is None else model
            return create_from_training_args(model, self.args, shrink_ratio=shrink_ratio, stop_rule=stop_rule)

    optimizers_map[name] = StableLoRAOptimizerCallback
