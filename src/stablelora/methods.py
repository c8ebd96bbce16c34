"""One registry of LoRA training methods: an optimizer method composed with adapter options.

Optimizer methods decide how the LoRA factors are updated; adapter options decide the PEFT ``LoraConfig``
(initialisation, scaling, DoRA). Any optimizer method combines with any adapter options and with a LoRA+
learning-rate ratio, except the combinations ``check_combination`` refuses, each with the reason.
``METHOD_TABLE`` renders the documented table (README, ``stablelora methods``).

torch and the optimizers are imported where a method is built, not here: a config is checked against this registry
before the heavy imports.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class MethodArguments:
    """How LoRA is trained: ``optimizer`` method + ``adapter`` options (+ their hyper-parameters)."""

    optimizer: str = field(default="adamw", metadata={"help": "optimizer method, see OPTIMIZER_METHODS"})
    adapter: list[str] = field(default_factory=lambda: ["default"], metadata={"help": "adapter options"})
    shrink_ratio: float = field(default=5e-4, metadata={"help": "stable-lora: lambda in A <- (1 - lambda) A"})
    stop_rule: bool = field(default=True, metadata={
        "help": "stable-lora: false shrinks A at every step, never stopping (the stop-rule ablation)"})
    loraplus_lr_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+ lr(B)/lr(A); 'lora+' defaults to 16; composes with stable-lora/adamw"})
    weight_decay_A: float = field(default=0.1, metadata={"help": "adamw-wd-a: decoupled weight decay on A only"})
    riemannian_reg: float = field(default=1e-2, metadata={"help": "riemannian: damping of the r x r inverse"})
    loraga_batches: int = field(default=8, metadata={"help": "lora-ga: batches for the gradient estimate"})

    def __post_init__(self):
        check_combination(self)  # once, where the settings are made: a config load or a caller's own code


@dataclass(frozen=True)
class OptimizerMethod:
    name: str
    description: str
    build: Callable[..., torch.optim.Optimizer]  # (model, method, optimizer_cls, kwargs, groups, weight_decay)


@dataclass(frozen=True)
class AdapterOption:
    name: str
    description: str
    lora_kwargs: dict[str, Any]
    mutates_base: bool = False  # PiSSA/OLoRA/LoRA-GA change W0; saving converts the adapter to plain LoRA
    nonzero_B: bool = False


def _kwargs_without(kwargs: dict, *names: str) -> dict:
    return {k: v for k, v in kwargs.items() if k not in names}


def _from_peft(module: str, name: str, method: str) -> Any:
    """A PEFT feature that a baseline needs; a clear error where the installed peft predates it (the core of
    stablelora supports older peft releases than the baselines do)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        import peft

        raise ValueError(f"{method} needs {module}.{name}, which peft {peft.__version__} does not have: "
                         "pip install -U peft (stablelora's lock uses peft 0.21.2).") from None


def _loraplus_groups(model, method, optimizer_cls, kwargs, weight_decay) -> list[dict]:
    from peft.optimizers import create_loraplus_optimizer

    ratio = method.loraplus_lr_ratio if method.loraplus_lr_ratio is not None else 16.0
    # PEFT gives its LoRA+ groups loraplus_weight_decay (default 0), not weight_decay: pass the run's own value, so
    # lora+ decays like every other method
    return create_loraplus_optimizer(model, optimizer_cls, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=weight_decay, **kwargs).param_groups


def _adamw(model, method, optimizer_cls, kwargs, groups, weight_decay):
    if method.loraplus_lr_ratio is not None:
        return _loraplus(model, method, optimizer_cls, kwargs, groups, weight_decay)
    return optimizer_cls(groups, **kwargs)


def _loraplus(model, method, optimizer_cls, kwargs, groups, weight_decay):
    return optimizer_cls(_loraplus_groups(model, method, optimizer_cls, kwargs, weight_decay), **kwargs)


def _stable(model, method, optimizer_cls, kwargs, groups, weight_decay):
    from stablelora.optim.stable import create_stablelora_optimizer

    if method.loraplus_lr_ratio is not None:
        groups = _loraplus_groups(model, method, optimizer_cls, kwargs, weight_decay)
    return create_stablelora_optimizer(model, optimizer_cls, shrink_ratio=method.shrink_ratio, params=groups,
                                       stop_rule=method.stop_rule, **kwargs)


def _riemannian(model, method, optimizer_cls, kwargs, groups, weight_decay):
    create_riemannian_optimizer = _from_peft("peft.optimizers", "create_riemannian_optimizer", "riemannian")
    return create_riemannian_optimizer(model, optimizer_cls, reg=method.riemannian_reg,
                                       weight_decay=weight_decay, **kwargs)


def _lora_rite(model, method, optimizer_cls, kwargs, groups, weight_decay):
    from stablelora.optim.lora_rite import LoRARITE
    from stablelora.optim.pairs import find_lora_pairs

    rite_kwargs = {k: kwargs[k] for k in ("lr", "betas", "eps") if k in kwargs}
    return LoRARITE(groups, find_lora_pairs(model), **rite_kwargs)


def _adamw_wd_a(model, method, optimizer_cls, kwargs, groups, weight_decay):
    from stablelora.optim.pairs import find_lora_pairs

    a_ids = {id(p.lora_A) for p in find_lora_pairs(model)}
    split = [{**g, "params": [p for p in g["params"] if id(p) not in a_ids]} for g in groups]
    split.append({"params": [p for p in model.parameters() if id(p) in a_ids], "weight_decay": method.weight_decay_A})
    return optimizer_cls([g for g in split if g["params"]], **kwargs)


OPTIMIZER_METHODS: dict[str, OptimizerMethod] = {
    m.name: m
    for m in [
        OptimizerMethod("adamw", "plain LoRA: the base optimizer (AdamW) on A and B", _adamw),
        OptimizerMethod("stable-lora", "Stable-LoRA: shrink A by (1 - shrink_ratio) per step until "
                        "‖A‖/in <= ‖B‖/out, per layer (arXiv 2603.05204)", _stable),
        OptimizerMethod("lora+", "LoRA+: lr(B) = loraplus_lr_ratio x lr(A) (PEFT create_loraplus_optimizer)", _loraplus),
        OptimizerMethod("riemannian", "Riemannian-preconditioned LoRA: r x r preconditioners on the gradients "
                        "(PEFT create_riemannian_optimizer)", _riemannian),
        OptimizerMethod("lora-rite", "LoRA-RITE: transformation-invariant matrix preconditioning (Yen et al.)",
                        _lora_rite),
        OptimizerMethod("adamw-wd-a", "control: AdamW with a large decoupled weight decay on A only "
                        "(is the shrink just weight decay?)", _adamw_wd_a),
    ]
}


def _lora_ga_kwargs() -> dict[str, Any]:
    return {"init_lora_weights": "lora_ga", "lora_ga_config": _from_peft("peft", "LoraGAConfig", "lora-ga")()}


ADAPTER_OPTIONS: dict[str, AdapterOption] = {
    o.name: o
    for o in [
        AdapterOption("default", "PEFT default init: A Kaiming-uniform, B = 0; scaling alpha / r", {}),
        AdapterOption("rslora", "rank-stabilised scaling alpha / sqrt(r)", {"use_rslora": True}),
        AdapterOption("dora", "DoRA: magnitude/direction decomposition (extra magnitude vector)", {"use_dora": True}),
        AdapterOption("gaussian", "A ~ N(0, 1/r), B = 0", {"init_lora_weights": "gaussian"}),
        AdapterOption("pissa", "PiSSA: A, B from the top-r SVD of W (fast SVD, 4 iterations); W <- residual",
                      {"init_lora_weights": "pissa_niter_4"}, mutates_base=True, nonzero_B=True),
        AdapterOption("olora", "OLoRA: A, B from a QR of W; W <- residual", {"init_lora_weights": "olora"},
                      mutates_base=True, nonzero_B=True),
        AdapterOption("lora-ga", "LoRA-GA: A, B from the SVD of a gradient estimate (PEFT preprocess_loraga)",
                      {}, mutates_base=True, nonzero_B=True),
    ]
}
_INIT_OPTIONS = ("gaussian", "pissa", "olora", "lora-ga")


def check_combination(method: MethodArguments) -> None:
    """Refuse unknown names and combinations that cannot work, saying why."""
    if method.optimizer not in OPTIMIZER_METHODS:
        raise ValueError(f"method.optimizer: unknown method {method.optimizer!r}; choose one of "
                         f"{sorted(OPTIMIZER_METHODS)}.")
    options = method.adapter if isinstance(method.adapter, list) else [method.adapter]
    unknown = [o for o in options if o not in ADAPTER_OPTIONS]
    if unknown:
        raise ValueError(f"method.adapter: unknown option(s) {unknown}; choose from {sorted(ADAPTER_OPTIONS)}.")
    inits = [o for o in options if o in _INIT_OPTIONS]
    if len(inits) > 1:
        raise ValueError(f"method.adapter: {inits} are alternative initialisations of the same factors; pick one.")
    if method.loraplus_lr_ratio is not None:
        if method.loraplus_lr_ratio <= 0:
            raise ValueError("method.loraplus_lr_ratio must be > 0 (LoRA+ uses lr(B) = ratio x lr(A)).")
        if method.optimizer in ("riemannian", "lora-rite", "adamw-wd-a"):
            reason = {
                "riemannian": "PEFT's Riemannian optimizer builds its own single parameter group",
                "lora-rite": "LoRA-RITE is transformation-invariant; a per-factor learning-rate ratio breaks that",
                "adamw-wd-a": "the weight-decay control is defined against plain AdamW",
            }[method.optimizer]
            raise ValueError(f"method.loraplus_lr_ratio cannot be combined with optimizer "
                             f"'{method.optimizer}': {reason}. Use it with adamw, lora+ or stable-lora.")
    if not method.stop_rule and method.optimizer != "stable-lora":
        raise ValueError(f"method.stop_rule=false is the stable-lora stop-rule ablation; optimizer "
                         f"'{method.optimizer}' does not shrink A. Remove it or use method.optimizer=stable-lora.")
    if method.optimizer == "stable-lora" and any(ADAPTER_OPTIONS[o].nonzero_B for o in options):
        warnings.warn(f"stable-lora with {inits[0]}: B starts non-zero, so the stop rule may hold at step 1 and "
                      "nothing is shrunk (the paper assumes A random, B = 0).", stacklevel=2)


def lora_config_kwargs(method: MethodArguments) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for option in method.adapter:
        kwargs.update(_lora_ga_kwargs() if option == "lora-ga" else ADAPTER_OPTIONS[option].lora_kwargs)
    return kwargs


def build_optimizer(model: nn.Module, method: MethodArguments, optimizer_cls: type[torch.optim.Optimizer],
                    optimizer_kwargs: dict, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer for ``method`` over ``groups`` (decay / no-decay groups of the trainable parameters)."""
    kwargs = _kwargs_without(optimizer_kwargs, "weight_decay", "params")
    return OPTIMIZER_METHODS[method.optimizer].build(model, method, optimizer_cls, kwargs, groups, weight_decay)


def method_table() -> str:
    rows = ["| kind | name | what it does |", "|---|---|---|"]
    rows += [f"| optimizer | `{m.name}` | {m.description} |" for m in OPTIMIZER_METHODS.values()]
    rows += [f"| adapter | `{o.name}` | {o.description} |" for o in ADAPTER_OPTIONS.values()]
    return "\n".join(rows)
