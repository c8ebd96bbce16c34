"""Stable-LoRA as a wrapper of any torch optimizer.

Once per ``optimizer.step()`` and before the base optimizer's update, for every LoRA layer still shrinking:
stop for good if ``||A||_F < (in/out) * ||B||_F`` (no shrink that step), else ``A <- (1 - shrink_ratio) * A``.
Then the base optimizer steps as usual on every parameter.

How it stays cheap and exact:
- Norms of all tracked layers come from two batched ``torch._foreach_norm`` calls; the stop decision and the shrink
  factor are device-side masks, so a GPU step never waits for the host.
- The host learns which layers stopped from a copy of the mask made without blocking (read on CPU at once, on an
  accelerator one or more steps later); it then drops them from the batch. A stale host view only keeps a stopped
  layer in the batch, where its factor is exactly 1.0, so results never depend on when the host catches up.
- Once every layer has stopped, ``step()`` is the base optimizer's step plus one attribute check.
- The per-layer state (shrinking flag, number of steps taken while shrinking) is saved per A in
  ``state_dict()["state"]`` as tensors, so it round-trips through ``state_dict()``/``load_state_dict()``: a layer
  that stopped stays stopped after a resume (the authors' code loses this and re-checks every layer).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from stablelora.optim.distributed import (check_replicas, global_norms, local_tensor, refuse_flat_parameters,
                                          shard_groups)
from stablelora.optim.pairs import LoraPair, check_adapter_dtypes, find_lora_pairs

SHRINKING_KEY = "stable_lora_shrinking"
SHRINK_STEPS_KEY = "stable_lora_shrink_steps"
_STATE_DTYPES = {SHRINKING_KEY: torch.bool, SHRINK_STEPS_KEY: torch.int64}


@dataclass(frozen=True)
class LayerStatus:
    """Stable-LoRA status of one LoRA layer of one adapter.

    ``stop_step`` is the 1-based optimizer step at which the stop rule held (that step did not shrink A);
    ``None`` while the layer is still shrinking. ``shrink_steps`` counts the steps that multiplied A by
    ``1 - shrink_ratio``.
    """

    name: str
    module: str
    adapter: str
    in_features: int
    out_features: int
    shrinking: bool
    shrink_steps: int

    @property
    def stop_step(self) -> int | None:
        return None if self.shrinking else self.shrink_steps + 1


def _check_shrink_ratio(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"shrink_ratio{where} must be a number in [0, 1), got {value!r}. The paper searches "
            "{0.0005, 0.001, 0.002, 0.005}; 0 disables the shrink."
        )
    return float(value)


class _Bucket:
    """The tracked layers that share device, dtype and sharding, with their state gathered into vectors."""

    def __init__(self, layer_state: dict[int, dict[str, torch.Tensor]], pairs: list[LoraPair],
                 keep_factors: list[float], groups: tuple, stop_rule: bool):
        self.pairs = pairs
        self.stop_rule = stop_rule
        # local shards (the tensors themselves without FSDP2); shapes below are global (DTensor.numel())
        self.lora_A = [local_tensor(p.lora_A) for p in pairs]
        self.lora_B = [local_tensor(p.lora_B) for p in pairs]
        self.groups = groups
        device, dtype = self.lora_A[0].device, self.lora_A[0].dtype
        # numel(A)/numel(B) = in/out, the reference's own form of the threshold, computed on the global shapes.
        self.ratio = torch.tensor([p.lora_A.numel() / p.lora_B.numel() for p in pairs], device=device)
        # 1 - shrink_ratio is formed in double on the host and rounded once, as `A.mul_(1 - shrink_ratio)` does.
        self.keep = torch.tensor(keep_factors, dtype=dtype, device=device)
        states = [layer_state[id(p.lora_A)] for p in pairs]
        # The vectors are the working storage; each layer's entries become views into them, so per-layer state is
        # current without any per-layer copy.
        self.shrinking = torch.stack([s[SHRINKING_KEY] for s in states])
        self.shrink_steps = torch.stack([s[SHRINK_STEPS_KEY] for s in states])
        for i, s in enumerate(states):
            s[SHRINKING_KEY] = self.shrinking[i]
            s[SHRINK_STEPS_KEY] = self.shrink_steps[i]
        self._host_mask: torch.Tensor | None = None
        self._copy_done: Any = None

    def shrink(self) -> None:
        if self.stop_rule:
            self._apply_stop_rule()
        self.shrink_steps.add_(self.shrinking)
        factors = torch.where(self.shrinking, self.keep, 1.0)
        torch._foreach_mul_(self.lora_A, list(factors.unbind(0)))
        self._post_mask()

    def _apply_stop_rule(self) -> None:
        if self.groups:
            norms = global_norms(self.lora_A + self.lora_B, self.groups)
            norms_a, norms_b = norms[: len(self.lora_A)], norms[len(self.lora_A) :]
        else:
            norms_a = torch.stack(torch._foreach_norm(self.lora_A))
            norms_b = torch.stack(torch._foreach_norm(self.lora_B))
        self.shrinking.logical_and_(~(norms_a < self.ratio * norms_b))
        check_replicas(self.shrinking)

    def _post_mask(self) -> None:
        """Start copying the mask to the host without blocking (on CPU this is just a read)."""
        if self.shrinking.device.type == "cpu" or self._copy_done is not None:
            return
        if self._host_mask is None:
            self._host_mask = torch.empty(self.shrinking.shape, dtype=torch.bool, pin_memory=True)
        self._host_mask.copy_(self.shrinking, non_blocking=True)
        self._copy_done = torch.Event(device=self.shrinking.device)
        self._copy_done.record()

    def host_mask(self) -> list[bool] | None:
        """The latest mask the host can read without waiting, or None if no copy has landed yet."""
        if self.shrinking.device.type == "cpu":
            return self.shrinking.tolist()
        if self._copy_done is None or not self._copy_done.query():
            return None
        self._copy_done = None
        return self._host_mask.tolist()


class StableLoRAOptimizerMixin:
    """Adds the Stable-LoRA shrink in front of a torch optimizer's ``step``. Use ``create_stablelora_optimizer``.

    The per-layer status is kept beside ``self.state`` (not in it: many optimizers initialise a parameter's state
    lazily when it is empty) and is written into ``state_dict()["state"][index of A]`` under the keys
    ``stable_lora_shrinking`` and ``stable_lora_shrink_steps``, from where ``load_state_dict`` restores it.
    """

    _base_optimizer_cls: type[Optimizer]

    def __init__(self, params: Any, *, lora_pairs: list[LoraPair], shrink_ratio: float, stop_rule: bool = True,
                 **kwargs: Any):
        shrink_ratio = _check_shrink_ratio(shrink_ratio, "")
        if not isinstance(stop_rule, bool):
            raise ValueError(f"stop_rule must be true or false, got {stop_rule!r}.")
        super().__init__(params, **kwargs)
        self.defaults["shrink_ratio"] = shrink_ratio
        self.defaults["stop_rule"] = stop_rule
        for i, group in enumerate(self.param_groups):
            group.setdefault("shrink_ratio", shrink_ratio)
            _check_shrink_ratio(group["shrink_ratio"], f" of parameter group {i}")
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        absent = [
            f"{pair.name}.{factor}"
            for pair in lora_pairs
            for factor, p in (("lora_A", pair.lora_A), ("lora_B", pair.lora_B))
            if id(p) not in group_of
        ]
        if absent:
            raise ValueError(
                f"{len(absent)} trainable LoRA factor(s) are missing from the parameter groups, e.g. {absent[:3]}. "
                "Stable-LoRA shrinks A and checks B, and the optimizer must update both: include every lora_A "
                "and lora_B (or freeze the adapter)."
            )
        self._lora_pairs = lora_pairs
        self._group_of_A = {id(p.lora_A): group_of[id(p.lora_A)] for p in lora_pairs}
        self._layer_state = {id(p.lora_A): self._fresh_layer_state(p.lora_A) for p in lora_pairs}
        self._rebuild_buckets()

    @staticmethod
    def _fresh_layer_state(lora_A: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            SHRINKING_KEY: torch.ones((), dtype=torch.bool, device=lora_A.device),
            SHRINK_STEPS_KEY: torch.zeros((), dtype=torch.int64, device=lora_A.device),
        }

    def _shrink_ratios(self) -> tuple[float, ...]:
        return tuple(g["shrink_ratio"] for g in self.param_groups)

    def _rebuild_buckets(self, still_shrinking: Iterable[LoraPair] | None = None) -> None:
        """Group the layers the host believes are still shrinking by (device, dtype)."""
        ratios = self._shrink_ratios()
        for i, r in enumerate(ratios):
            _check_shrink_ratio(r, f" of parameter group {i}")
        self._bucket_ratios = ratios
        if still_shrinking is None:
            still_shrinking = [p for p in self._lora_pairs if bool(self._layer_state[id(p.lora_A)][SHRINKING_KEY])]
        by_key: dict[tuple, list[LoraPair]] = {}
        for pair in still_shrinking:
            groups = shard_groups(pair.lora_A)
            if groups != shard_groups(pair.lora_B):
                raise ValueError(f"{pair.name}: lora_A and lora_B are sharded over different process groups; "
                                 "shard both factors of a LoRA layer with the same fully_shard call.")
            key = (pair.lora_A.device, pair.lora_A.dtype, tuple(id(g) for g in groups))
            by_key.setdefault(key, []).append(pair)
        self._buckets = [
            _Bucket(self._layer_state, pairs, [1.0 - ratios[self._group_of_A[id(p.lora_A)]] for p in pairs],
                    shard_groups(pairs[0].lora_A), self.defaults["stop_rule"])
            for pairs in by_key.values()
        ]

    def _drop_stopped_layers(self) -> None:
        """Rebuild the buckets without the layers the host has seen stop."""
        stopped = False
        survivors: list[LoraPair] = []
        for bucket in self._buckets:
            mask = bucket.host_mask()
            if mask is None:
                survivors.extend(bucket.pairs)
                continue
            stopped |= not all(mask)
            survivors.extend(p for p, keep in zip(bucket.pairs, mask) if keep)
        if stopped:
            self._rebuild_buckets(survivors)

    @torch.no_grad()
    def shrink_lora_A(self) -> None:
        """The Stable-LoRA half of a step; ``step()`` calls it before the base update."""
        if self._shrink_ratios() != self._bucket_ratios:  # a group's shrink_ratio was changed since last step
            self._rebuild_buckets([p for b in self._buckets for p in b.pairs])
        for bucket in self._buckets:
            bucket.shrink()
        self._drop_stopped_layers()

    def _is_state_initialisation_step(self) -> bool:
        """True for the zero-gradient, lr = 0 step that torch.distributed.checkpoint takes to create optimizer
        state before saving or loading; it is not a training step, so it must neither shrink nor count."""
        if self.state or any(g.get("lr", 1.0) != 0 for g in self.param_groups):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"]]
        return all(grad is not None and not local_tensor(grad).any() for grad in grads)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            # The reference evaluates the closure (forward + backward) before the shrink, so gradients are taken
            # at the unshrunk A; evaluating it here keeps that order for every base optimizer.
            with torch.enable_grad():
                loss = closure()
        if self._buckets and not self._is_state_initialisation_step():
            self.shrink_lora_A()
        base_step = self._base_optimizer_cls.step
        # Call the base step unwrapped so step hooks (profiling, user pre/post hooks) run once, not twice.
        base_step = base_step.__wrapped__ if getattr(base_step, "hooked", False) else base_step
        result = base_step(self)
        return loss if closure is not None else result

    def _index_of_A(self) -> dict[int, int]:
        """id(A) -> the integer key torch's state_dict gives A (its position across the param groups)."""
        positions = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {key: positions[key] for key in self._layer_state}

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        packed = dict(state_dict["state"])
        for key, index in self._index_of_A().items():
            # A new dict: the base's entry is the live self.state[A], which must not gain our keys.
            packed[index] = {**packed.get(index, {}), **{k: v.clone() for k, v in self._layer_state[key].items()}}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch would cast these to the parameter dtype (bool flags to floats, step counts fp16-rounded), and an
        # entry holding only them would hide a missing base state, so take them out before the base loads.
        ours: dict[Any, dict[str, torch.Tensor]] = {}
        base_state = {}
        for key, entry in state_dict["state"].items():
            ours[key] = {k: v for k, v in entry.items() if k in _STATE_DTYPES}
            rest = {k: v for k, v in entry.items() if k not in _STATE_DTYPES}
            if rest:
                base_state[key] = rest
        super().load_state_dict({**state_dict, "state": base_state})
        for group in self.param_groups:  # a plain optimizer's checkpoint has no shrink_ratio in its groups
            group.setdefault("shrink_ratio", self.defaults["shrink_ratio"])
        # Saved keys are matched to parameters by position, as torch does: they are integers from state_dict(),
        # or parameter names when torch.distributed.checkpoint loads.
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        missing = []
        for key, position in self._index_of_A().items():
            saved = ours.get(saved_keys[position], {})
            state = self._layer_state[key]
            if set(saved) != set(_STATE_DTYPES):
                missing.append(key)
                state.update(self._fresh_layer_state(state[SHRINKING_KEY]))
                continue
            for name, value in saved.items():
                state[name] = local_tensor(value).to(device=state[name].device, dtype=_STATE_DTYPES[name]).clone()
        if missing:
            warnings.warn(
                f"The loaded optimizer state has no Stable-LoRA status for {len(missing)} of {len(self._lora_pairs)} "
                "LoRA layer(s): it was saved by a plain optimizer. Those layers start shrinking afresh.",
                stacklevel=2,
            )
        self._rebuild_buckets()

    def stable_lora_status(self) -> list[LayerStatus]:
        """Per-layer status, for logs and diagnostics. Reads device values, so it syncs: call it at log time."""
        out = []
        for pair in self._lora_pairs:
            state = self._layer_state[id(pair.lora_A)]
            out.append(
                LayerStatus(
                    name=pair.name,
                    module=pair.module_name,
                    adapter=pair.adapter,
                    in_features=pair.in_features,
                    out_features=pair.out_features,
                    shrinking=bool(state[SHRINKING_KEY]),
                    shrink_steps=int(state[SHRINK_STEPS_KEY]),
                )
            )
        return out

    @property
    def lora_pairs(self) -> list[LoraPair]:
        return list(self._lora_pairs)

    @property
    def all_stopped(self) -> bool:
        """True once the host knows every layer has stopped; from then on step() adds nothing."""
        return not self._buckets


@cache
def stable_lora_class(optimizer_cls: type[Optimizer]) -> type[Optimizer]:
    """The Stable-LoRA subclass of ``optimizer_cls`` (one class per base, so isinstance checks are stable)."""
    return type(
        f"StableLoRA{optimizer_cls.__name__}",
        (StableLoRAOptimizerMixin, optimizer_cls),
        {"_base_optimizer_cls": optimizer_cls, "__module__": __name__},
    )


def _check_optimizer_cls(optimizer_cls: Any) -> None:
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW), got {optimizer_cls!r}."
        )
    closure = inspect.signature(optimizer_cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{optimizer_cls.__name__} needs a closure in step() and re-evaluates the loss several times per step "
            "(line search); a shrink between those evaluations breaks its curvature estimates. Use an optimizer "
            "whose closure is optional (AdamW, Adam, SGD, ...)."
        )


def _check_groups_belong(model: nn.Module, params: Any) -> list:
    """Materialise ``params`` and refuse parameters that are not the model's, or trainable ones left out."""
    groups = list(params)
    if not groups:
        raise ValueError("params is empty: give the model's trainable parameters or parameter groups.")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": list(g["params"])} for g in groups]
    names = {id(p): n for n, p in model.named_parameters()}
    foreign = sum(1 for g in groups for p in g["params"] if id(p) not in names)
    if foreign:
        raise ValueError(
            f"{foreign} parameter(s) in the given groups do not belong to the model passed in. Build the groups "
            "from the same model object (after PEFT/FSDP wrapping) that you pass to create_stablelora_optimizer."
        )
    given = {id(p) for g in groups for p in g["params"]}
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in given]
    if left_out:
        raise ValueError(
            f"{len(left_out)} trainable parameter(s) of the model are in no parameter group, e.g. {left_out[:3]}; "
            "they would silently never train. Add them to a group, or set requires_grad=False."
        )
    return groups


def create_stablelora_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer] = torch.optim.AdamW,
    *,
    shrink_ratio: float,
    params: Iterable[Any] | None = None,
    stop_rule: bool = True,
    **optimizer_kwargs: Any,
) -> Optimizer:
    """Build ``optimizer_cls`` with Stable-LoRA's early shrink of every LoRA A in front of each step.

    Args:
        model: a PEFT model (or any module containing PEFT LoRA layers), possibly wrapped by DDP/FSDP.
        optimizer_cls: any torch-style optimizer class whose ``step`` closure is optional.
        shrink_ratio: lambda in ``A <- (1 - lambda) A``; the paper searches {5e-4, 1e-3, 2e-3, 5e-3}.
            A parameter group may carry its own ``"shrink_ratio"``.
        params: optional parameter groups built by another recipe (e.g. LoRA+'s
            ``create_loraplus_optimizer(...).param_groups``); by default every trainable parameter of ``model``
            in one group.
        stop_rule: False shrinks every A at every step and never stops: the paper's ablation, for benchmarks
            that ask what the stop rule is worth. Keep the default for training.
        **optimizer_kwargs: passed to ``optimizer_cls`` unchanged (lr, weight_decay, betas, ...).

    Returns:
        An instance of a subclass of ``optimizer_cls``; ``stable_lora_status()`` reports each layer.
    """
    _check_optimizer_cls(optimizer_cls)
    _check_shrink_ratio(shrink_ratio, "")
    refuse_flat_parameters(model)
    pairs = find_lora_pairs(model)
    half = check_adapter_dtypes(pairs)
    if half:
        warnings.warn(
            f"LoRA weights are float16 in {len(half)} layer(s) (e.g. {half[0].name}): each shrink rounds, so A "
            "shrinks less than (1 - shrink_ratio)^t. Keep adapters in float32 for the exact method.",
            stacklevel=2,
        )
    if params is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        groups = _check_groups_belong(model, params)
    return stable_lora_class(optimizer_cls)(groups, lora_pairs=pairs, shrink_ratio=shrink_ratio, stop_rule=stop_rule,
                                            **optimizer_kwargs)
