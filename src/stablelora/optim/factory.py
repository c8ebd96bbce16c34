"""A drop-in optimizer factory for HF ``Trainer`` and every trainer built on it (TRL, unsloth, axolotl, ms-swift).

``Trainer(..., optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory, kwargs))`` calls
``StableLoRAOptimizerFactory()(model, **kwargs)`` in ``create_optimizer`` (transformers treats any callable that is
not an ``Optimizer`` class as a factory). The optimizer is therefore built from the model Trainer trains, at the
point where Trainer builds its own, and Accelerate prepares it as usual: under FSDP2 it swaps the parameters in
place after this, which the Stable-LoRA optimizer follows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from stablelora.optim.stable import create_stablelora_optimizer


def _decay_parameter_names(model: nn.Module) -> set[str] | None:
    """The names Trainer applies weight decay to (not biases or norms), by Trainer's own rule; None without
    transformers."""
    try:
        from transformers import Trainer
    except ImportError:
        return None
    return set(Trainer.get_decay_parameter_names(None, model))  # the method does not use self


def optimizer_class(optimizer_cls: type[Optimizer] | str) -> type[Optimizer]:
    """An optimizer class, or one named in a YAML config: "AdamW" or "torch.optim.AdamW"."""
    if not isinstance(optimizer_cls, str):
        return optimizer_cls
    found = getattr(torch.optim, optimizer_cls.removeprefix("torch.optim."), None)
    if isinstance(found, type) and issubclass(found, Optimizer) and found is not Optimizer:
        return found
    known = sorted(name for name, value in vars(torch.optim).items()
                   if isinstance(value, type) and issubclass(value, Optimizer) and value is not Optimizer)
    raise ValueError(f"optimizer_cls {optimizer_cls!r} is not a torch.optim optimizer. Name one of {known} (case "
                     "matters), or pass the class itself for an optimizer from another package.")


class StableLoRAOptimizerFactory:
    """Builds a Stable-LoRA optimizer for ``Trainer(optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory, {...}))``.

    Keyword arguments: ``optimizer_cls`` (default ``torch.optim.AdamW``; a class, or a torch.optim name such as
    ``"SGD"``, as a YAML config gives it), ``shrink_ratio`` (default 5e-4),
    ``stop_rule``, ``lr`` (required: Trainer does not pass ``TrainingArguments.learning_rate`` to a factory),
    ``weight_decay`` (applied as Trainer does: not to biases and norm weights), and any other keyword of
    ``optimizer_cls`` (betas, eps, fused, ...).
    """

    def __call__(self, model: nn.Module, *, lr: float | None = None,
                 optimizer_cls: type[Optimizer] | str = torch.optim.AdamW,
                 shrink_ratio: float = 5e-4, stop_rule: bool = True, weight_decay: float = 0.0,
                 **optimizer_kwargs: Any) -> Optimizer:
        if lr is None:
            raise TypeError(
                "StableLoRAOptimizerFactory needs lr in its kwargs, e.g. optimizer_cls_and_kwargs="
                "(StableLoRAOptimizerFactory, {'lr': 2e-4, ...}): Trainer passes only those kwargs to a factory, "
                "not TrainingArguments.learning_rate, and the optimizer's own default would be used silently."
            )
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = _decay_parameter_names(model)
        if decay is None or not weight_decay:
            groups = [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
        else:
            groups = [
                {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
                {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
            ]
        return create_stablelora_optimizer(model, optimizer_class(optimizer_cls), shrink_ratio=shrink_ratio, stop_rule=stop_rule,
                                           params=[g for g in groups if g["params"]], lr=lr, **optimizer_kwargs)


def create_from_training_args(model: nn.Module, training_args: Any, *, shrink_ratio: float = 5e-4,
                              stop_rule: bool = True) -> Optimizer:
    """Stable-LoRA over the base optimizer a ``TrainingArguments`` asks for (``optim``, ``learning_rate``, betas, eps,
    ``weight_decay``): what a framework's plug-in builds, so its users keep configuring the optimizer as they do."""
    from transformers import Trainer

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    return StableLoRAOptimizerFactory()(model, optimizer_cls=optimizer_cls, shrink_ratio=shrink_ratio,
                                        stop_rule=stop_rule, weight_decay=training_args.weight_decay,
                                        **optimizer_kwargs)
