"""Stable-LoRA in ms-swift: ``swift sft --external_plugins my_plugin.py --optimizer stable_lora ...``.

ms-swift builds its optimizer through ``optimizers_map[args.optimizer](args, trainer)`` (``swift/optimizers``), and
``--external_plugins`` imports a user's file before training. That file calls :func:`register`::

    # my_plugin.py
    from stablelora.integrations.swift import register
    register(shrink_ratio=5e-4)      # adds --optimizer stable_lora

The base optimizer, learning rate, betas, eps and weight decay come from swift's own arguments (``--optim``,
``--learning_rate``, ...), exactly as for its default optimizer; the learning-rate schedule is swift's.
"""

from __future__ import annotations

from torch.optim import Optimizer

from stablelora.optim.factory import create_from_training_args


def register(name: str = "stable_lora", *, shrink_ratio: float = 5e-4, stop_rule: bool = True) -> None:
    """Make ``--optimizer <name>`` build a Stable-LoRA optimizer with these settings."""
    from swift.optimizers import OptimizerCallback, optimizers_map

    class StableLoRAOptimizerCallback(OptimizerCallback):
        def create_optimizer(self, model=None) -> Optimizer:
            model = self.trainer.model if model is None else model
            return create_from_training_args(model, self.args, shrink_ratio=shrink_ratio, stop_rule=stop_rule)

    optimizers_map[name] = StableLoRAOptimizerCallback
