"""A drop-in optimizer factory for HF ``Trainer`` and every trainer built on it (TRL, unsloth, axolotl, ms-swift).

``Trainer(..., optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory, kwargs))`` calls
``StableLoRAOptimizerFactory()(model, **kwargs)`` in ``create_optimizer`` (transformers treats any callable that is
not an ``Optimizer`` class as a factory). The optimizer is therefore built from the model Trainer trains, at the
point where Trainer builds its own, and Accelerate prepares it as usual: under FSDP2 it swaps the parameters in
place after this, which the Stable-LoRA optimizer follows; under DeepSpeed ZeRO it shrinks the fp32 masters.
``stablelora.train.guard.use_stable_lora(trainer)`` sets the factory from the trainer's own ``TrainingArguments``
and adds the guard that stops a run in which something replaced it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from stablelora.optim.stable import create_stablelora_optimizer
from stablelora.optim.zero import check_zero_config


def _decay_parameter_names(model: nn.Module) -> set[str] | None:
    """The names Trainer applies weight decay to (not biases or norms), by Trainer's own rule; None without
    transformers."""
    try:
        from transformers import Trainer
    except ImportError:
        return None
    return set(Trainer.get_decay_parameter_names(None, model))  # the method does not use self


def _active_deepspeed_config() -> dict | None:
    """The DeepSpeed config of the TrainingArguments in this process (transformers keeps it), if any."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:
        return None
    return deepspeed_config()


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
        zero_config = _active_deepspeed_config()
        if zero_config is not None:
            check_zero_config(zero_config)
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


# What TrainingArguments' optimizer handlers may return besides keyword arguments: parameter groups or a model of
# their own (GaLore, APOLLO, the layer-wise optimizers, LOMO), which replace the parameters Stable-LoRA shrinks.
_REWRITING_OPTIMIZERS = ("galore", "apollo", "lomo", "layerwise")  # refused by name: some need packages to build
PARAMETER_REWRITING_KEYS = ("params", "model", "optimizer_dict")


def factory_kwargs_from_training_args(training_args: Any, model: nn.Module) -> dict[str, Any]:
    """The factory's kwargs for the base optimizer a ``TrainingArguments`` asks for: ``optim`` (and ``optim_args``),
    ``learning_rate``, betas, eps and ``weight_decay``, as Trainer itself would build it."""
    from transformers import Trainer

    optim = str(getattr(training_args.optim, "value", training_args.optim))
    rewriting = any(name in optim for name in _REWRITING_OPTIMIZERS)
    optimizer_cls, optimizer_kwargs = (None, {}) if rewriting else \
        Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    if rewriting or any(k in optimizer_kwargs for k in PARAMETER_REWRITING_KEYS):
        raise ValueError(f"optim={optim!r} builds its own parameter groups or model, which would replace the LoRA "
                         "factors Stable-LoRA shrinks; choose an optimizer that steps the model's parameters "
                         "(adamw_torch, adamw_torch_fused, sgd, adafactor, ...).")
    kwargs = dict(optimizer_kwargs)
    # optim_args may name weight_decay too (optim="sgd", optim_args="weight_decay=0.1"): one value, that one
    weight_decay = kwargs.pop("weight_decay", training_args.weight_decay)
    return {"optimizer_cls": optimizer_cls, "weight_decay": weight_decay, **kwargs}


def create_from_training_args(model: nn.Module, training_args: Any, *, shrink_ratio: float = 5e-4,
                              stop_rule: bool = True) -> Optimizer:
    """Stable-LoRA over the base optimizer a ``TrainingArguments`` asks for (``optim``, ``learning_rate``, betas, eps,
    ``weight_decay``): what a framework's plug-in builds, so its users keep configuring the optimizer as they do."""
    return StableLoRAOptimizerFactory()(model, shrink_ratio=shrink_ratio, stop_rule=stop_rule,
                                        **factory_kwargs_from_training_args(training_args, model))
