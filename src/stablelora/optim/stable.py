"""Stable-LoRA as a wrapper of any torch optimizer.

Once per ``optimizer.step()`` and before the base optimizer's update, for every LoRA layer still shrinking:
stop for good if ``||A||_F < (in/out) * ||B||_F`` (no shrink that step), else ``A <- (1 - shrink_ratio) * A``.
Then the base optimizer steps as usual on every parameter.

How it stays exact where users train:
- The factors are found in ``param_groups`` at step time, by the position they had when the optimizer was built.
  Accelerate's FSDP2 builds the optimizer first and then swaps every parameter for its sharded DTensor in place;
  the shrink follows the swap instead of scaling tensors nobody trains.
- A step the base optimizer does not take is not a Stable-LoRA step either: when a GradScaler finds inf/NaN
  gradients (fused optimizers get ``found_inf`` and skip on the device) nothing is shrunk, stopped or counted, and
  a layer whose A got no gradient this step (an unrouted expert, an idle adapter) is left alone, as torch
  optimizers leave parameters without a gradient alone.
- Norms of all tracked layers come from two batched ``torch._foreach_norm`` calls; the stop decision and the shrink
  factor are device-side masks, so a step never waits for the device.
- Every ``HOST_CHECK_EVERY`` steps the host takes the mask it copied (without blocking) at the previous check and
  drops the layers stopped in it. The cadence is fixed, so every rank changes membership at the same step; a
  stopped layer still in a bucket has factor exactly 1.0, so results never depend on when it is dropped.
  Once every layer is dropped, ``step()`` is the base optimizer's step plus one attribute check.
- The per-layer state (shrinking flag, number of steps taken while shrinking) is saved per A in
  ``state_dict()["state"]`` as tensors, so a layer that stopped stays stopped after a resume.
- Under DeepSpeed ZeRO the optimizer steps flat fp32 partitions, and the model's LoRA tensors are overwritten from
  them after each step: the shrink then scales each A's slice of the fp32 master (``zero.py``), once per engine
  step, and the per-layer state is saved under ``state_dict()["stable_lora"]``.
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
from stablelora.optim.zero import data_parallel_group, master_slice, zero_stage

SHRINKING_KEY = "stable_lora_shrinking"
SHRINK_STEPS_KEY = "stable_lora_shrink_steps"
_STATE_DTYPES = {SHRINKING_KEY: torch.bool, SHRINK_STEPS_KEY: torch.int64}
ZERO_STATE_KEY = "stable_lora"  # under DeepSpeed ZeRO: every layer's status, in pair order


@dataclass(frozen=True)
class LayerStatus:
    """Stable-LoRA status of one LoRA layer of one adapter.

    ``stop_step`` is the 1-based step at which the stop rule held (that step did not shrink A); ``None`` while the
    layer is still shrinking. ``shrink_steps`` counts the steps that multiplied A by ``1 - shrink_ratio``. Both
    count the steps the layer took part in: the optimizer's step number, unless steps were skipped (an inf/NaN
    step under a GradScaler, or no gradient for the layer).
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


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, copied without making the host wait for the device."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class _Bucket:
    """The tracked layers that share device, dtype and sharding, with their state gathered into vectors."""

    def __init__(self, layers: list[int], lora_A: list[torch.Tensor], lora_B: list[torch.Tensor], ratio: list[float],
                 groups: tuple, params_A: list[torch.Tensor], layer_state: list[dict[str, torch.Tensor]],
                 keep_factors: list[float], stop_rule: bool):
        self.layers = layers  # indices into the optimizer's pair list
        self.stop_rule = stop_rule
        self.groups = groups  # the norms are summed over these process groups
        self.params_A = params_A  # the parameters whose .grad says who steps (none to check under ZeRO)
        self.lora_A, self.lora_B = lora_A, lora_B  # what is shrunk and measured: the local shards or slices
        self.device, dtype = lora_A[0].device, lora_A[0].dtype
        # numel(A)/numel(B) = in/out, the reference's own form of the threshold, computed on the global shapes.
        self.ratio = _on_device(ratio, torch.float32, self.device)
        # 1 - shrink_ratio is formed in double on the host and rounded once, as `A.mul_(1 - shrink_ratio)` does.
        self.keep = _on_device(keep_factors, dtype, self.device)
        states = [layer_state[i] for i in layers]
        # The vectors are the working storage; each layer's entries become views into them, so per-layer state is
        # current without any per-layer copy.
        self.shrinking = torch.stack([s[SHRINKING_KEY].to(self.device) for s in states])
        self.shrink_steps = torch.stack([s[SHRINK_STEPS_KEY].to(self.device) for s in states])
        for i, s in enumerate(states):
            s[SHRINKING_KEY] = self.shrinking[i]
            s[SHRINK_STEPS_KEY] = self.shrink_steps[i]
        self._posted_mask: torch.Tensor | None = None
        self._posted_event: torch.Event | None = None

    def shrink(self, acting: torch.Tensor | None) -> None:
        """One step: ``acting`` masks the layers the base optimizer updates this step (None: all of them)."""
        active = self.shrinking if acting is None else self.shrinking & acting
        if self.stop_rule:
            stop_now = active & (self._norms(self.lora_A) < self.ratio * self._norms(self.lora_B))
            self.shrinking.logical_and_(~stop_now)
            active = active & ~stop_now
        self.shrink_steps.add_(active)
        torch._foreach_mul_(self.lora_A, list(torch.where(active, self.keep, 1.0).unbind(0)))
        check_replicas(self.shrinking)

    def _norms(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """Frobenius norms of whole factors: of the local tensors, or summed over the shards under FSDP2."""
        if self.groups:
            return global_norms(factors, self.groups)
        return torch.stack(torch._foreach_norm(factors))

    def post_mask(self) -> None:
        """Start copying the shrinking mask to the host without blocking; ``posted_mask`` reads it later."""
        if self.device.type == "cpu":
            self._posted_mask = self.shrinking.clone()
            return
        if self._posted_mask is None:
            self._posted_mask = torch.empty(self.shrinking.shape, dtype=torch.bool, pin_memory=True)
        self._posted_mask.copy_(self.shrinking, non_blocking=True)
        # Record on the stream of the bucket's own device (a model on cuda:1, or spread by device_map="auto"),
        # not on the current device's stream.
        self._posted_event = torch.Event(device=self.device)
        self._posted_event.record(torch.get_device_module(self.device.type).current_stream(self.device))

    def posted_mask(self) -> list[bool] | None:
        """The mask posted at the previous check (long landed by now), or None before the first check."""
        if self._posted_mask is None:
            return None
        if self._posted_event is not None:
            self._posted_event.synchronize()
        return self._posted_mask.tolist()


class StableLoRAOptimizerMixin:
    """Adds the Stable-LoRA shrink in front of a torch optimizer's ``step``. Use ``create_stablelora_optimizer``.

    The per-layer status is kept beside ``self.state`` (not in it: many optimizers initialise a parameter's state
    lazily when it is empty) and is written into ``state_dict()["state"][index of A]`` under the keys
    ``stable_lora_shrinking`` and ``stable_lora_shrink_steps``, from where ``load_state_dict`` restores it.
    """

    _base_optimizer_cls: type[Optimizer]
    #: how many steps apart the host drops stopped layers (a fixed cadence, so all ranks agree)
    HOST_CHECK_EVERY = 16

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
        position = {id(p): (g, i) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])}
        absent = [
            f"{pair.name}.{factor}"
            for pair in lora_pairs
            for factor, p in (("lora_A", pair.lora_A), ("lora_B", pair.lora_B))
            if id(p) not in position
        ]
        if absent:
            raise ValueError(
                f"{len(absent)} trainable LoRA factor(s) are missing from the parameter groups, e.g. {absent[:3]}. "
                "Stable-LoRA shrinks A and checks B, and the optimizer must update both: include every lora_A "
                "and lora_B (or freeze the adapter)."
            )
        self._lora_pairs = lora_pairs
        # Where each layer's A and B sit in param_groups: the parameters are looked up there at step time.
        self._slots = [(position[id(p.lora_A)], position[id(p.lora_B)]) for p in lora_pairs]
        self._layer_state = [self._fresh_layer_state(p.lora_A) for p in lora_pairs]
        self._shrinking_layers = list(range(len(lora_pairs)))
        self._buckets: list[_Bucket] | None = None  # built on the first step, from the parameters stepped then
        self._bound: list[tuple[torch.Tensor, torch.Tensor]] = []  # (A, B) of each shrinking layer, as bound
        self._steps_shrunk = 0  # steps that ran the shrink: the clock of the host's checks
        self._zero_stepped: set[tuple] = set()  # under ZeRO: the (sub-)groups stepped since the last shrink

    @staticmethod
    def _fresh_layer_state(lora_A: torch.Tensor) -> dict[str, torch.Tensor]:
        device = local_tensor(lora_A).device
        if device.type == "meta":  # not materialised yet (FSDP2 loading on rank 0 only): the bucket moves it later
            device = torch.device("cpu")
        return {
            SHRINKING_KEY: torch.ones((), dtype=torch.bool, device=device),
            SHRINK_STEPS_KEY: torch.zeros((), dtype=torch.int64, device=device),
        }

    def _live_factors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (A, B) as the optimizer holds them now, checked against the shapes it was built with."""
        pair = self._lora_pairs[layer]
        factors = []
        for (g, i), factor, built in zip(self._slots[layer], ("lora_A", "lora_B"), (pair.lora_A, pair.lora_B)):
            params = self.param_groups[g]["params"] if g < len(self.param_groups) else []
            live = params[i] if i < len(params) else None
            if live is None or live.shape != built.shape:
                raise RuntimeError(
                    f"Stable-LoRA: {pair.name}.{factor} is no longer at its place in the optimizer's param_groups "
                    f"(group {g}, index {i}; found {None if live is None else tuple(live.shape)}, expected "
                    f"{tuple(built.shape)}). Something rebuilt param_groups with other parameters; build the "
                    "optimizer after such a change, or swap parameters in place (as Accelerate's FSDP2 does)."
                )
            factors.append(live)
        return factors[0], factors[1]

    def _still_bound(self) -> bool:
        """Whether the buckets were built over the tensors that sit in param_groups now (identity, no checks)."""
        if self._buckets is None:
            return False
        try:
            return all(self.param_groups[g]["params"][i] is tensor
                       for layer, factors in zip(self._shrinking_layers, self._bound)
                       for (g, i), tensor in zip(self._slots[layer], factors))
        except IndexError:
            return False

    def _bind(self) -> None:
        """(Re)build the buckets over the parameters the optimizer holds now, if they are not the bound ones."""
        if self._still_bound():
            return
        live = [self._live_factors(i) for i in self._shrinking_layers]
        ratios = [g["shrink_ratio"] for g in self.param_groups]
        for i, r in enumerate(ratios):
            _check_shrink_ratio(r, f" of parameter group {i}")
        by_key: dict[tuple, list[int]] = {}
        for layer, (a, b) in zip(self._shrinking_layers, live):
            groups = shard_groups(a)
            if groups != shard_groups(b):
                raise ValueError(f"{self._lora_pairs[layer].name}: lora_A and lora_B are sharded over different "
                                 "process groups; shard both factors of a LoRA layer with the same fully_shard call.")
            key = (local_tensor(a).device, a.dtype, tuple(id(g) for g in groups))
            by_key.setdefault(key, []).append(layer)
        factors = dict(zip(self._shrinking_layers, live))
        self._buckets = []
        for layers in by_key.values():
            a, b = [factors[i][0] for i in layers], [factors[i][1] for i in layers]
            self._buckets.append(_Bucket(
                layers, [local_tensor(t) for t in a], [local_tensor(t) for t in b],
                [x.numel() / y.numel() for x, y in zip(a, b)], shard_groups(a[0]), a, self._layer_state,
                [1.0 - ratios[self._slots[i][0][0]] for i in layers], self.defaults["stop_rule"]))
        self._bound = live
        self._bucket_ratios = ratios

    def _bind_zero_masters(self) -> None:
        """Under DeepSpeed ZeRO: one bucket over this rank's slices of the fp32 masters of the shrinking layers."""
        if self._buckets is not None:
            return
        pairs = [self._lora_pairs[i] for i in self._shrinking_layers]
        slices = [(master_slice(p.lora_A), master_slice(p.lora_B)) for p in pairs]
        device = next((t.device for pair in slices for t in pair if t.numel()), slices[0][0].device)
        slices = [tuple(t if t.numel() else t.to(device) for t in pair) for pair in slices]
        ratio = self.defaults["shrink_ratio"]
        if any(g.get("shrink_ratio", ratio) != ratio for g in self.param_groups):
            raise ValueError("Stable-LoRA under DeepSpeed ZeRO takes one shrink_ratio for all layers (ZeRO flattens "
                             "the parameter groups); remove the per-group \"shrink_ratio\" entries.")
        self._buckets = [_Bucket(
            list(self._shrinking_layers), [a for a, _ in slices], [b for _, b in slices],
            [p.in_features / p.out_features for p in pairs], (data_parallel_group(pairs[0].lora_A),), [],
            self._layer_state, [1.0 - ratio] * len(pairs), self.defaults["stop_rule"])]

    def _under_zero(self) -> bool:
        return zero_stage(self._lora_pairs[0].lora_A) is not None

    def _zero_engine_step_starts(self) -> bool:
        """ZeRO calls step() once per (sub-)group of an engine step: the first call of a new engine step is the
        one whose parameters were already stepped since the last shrink (or the very first call)."""
        key = tuple(id(p) for group in self.param_groups for p in group["params"])
        if key in self._zero_stepped or not self._zero_stepped:
            self._zero_stepped = {key}
            return True
        self._zero_stepped.add(key)
        return False

    def _acting_mask(self, bucket: _Bucket) -> torch.Tensor | None:
        """Which of the bucket's layers the base step updates: not on a skipped (inf/NaN) step, not without a
        gradient. None when all of them (the common case, no extra work)."""
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler for optimizers that skip on the device
        has_grad = [a.grad is not None for a in bucket.params_A]
        mask = None if all(has_grad) else _on_device(has_grad, torch.bool, bucket.device)
        if found_inf is not None:
            took_step = found_inf.to(bucket.device, non_blocking=True) == 0
            mask = took_step if mask is None else mask & took_step
        return mask

    def _drop_stopped_layers(self) -> None:
        """At a fixed cadence: drop the layers stopped in the masks posted one cadence ago, post new masks."""
        self._steps_shrunk += 1
        if self._steps_shrunk % self.HOST_CHECK_EVERY:
            return
        stopped = set()
        for bucket in self._buckets:
            mask = bucket.posted_mask()
            if mask is not None:
                stopped.update(layer for layer, shrinking in zip(bucket.layers, mask) if not shrinking)
        if stopped:
            self._shrinking_layers = [i for i in self._shrinking_layers if i not in stopped]
            self._buckets = None
            if self._shrinking_layers:
                self._bind_zero_masters() if self._under_zero() else self._bind()
        for bucket in self._buckets or []:
            bucket.post_mask()

    @torch.no_grad()
    def shrink_lora_A(self) -> None:
        """The Stable-LoRA half of a step; ``step()`` calls it before the base update."""
        if self._under_zero():
            self._bind_zero_masters()
        else:
            self._bind()
            if [g["shrink_ratio"] for g in self.param_groups] != self._bucket_ratios:  # changed since the last step
                self._buckets = None
                self._bind()
        for bucket in self._buckets:
            bucket.shrink(self._acting_mask(bucket))
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
        if self._shrinking_layers and not self._is_state_initialisation_step() and \
                (not self._under_zero() or self._zero_engine_step_starts()):
            self.shrink_lora_A()
        base_step = self._base_optimizer_cls.step
        # Call the base step unwrapped so step hooks (profiling, user pre/post hooks) run once, not twice.
        base_step = base_step.__wrapped__ if getattr(base_step, "hooked", False) else base_step
        result = base_step(self)
        return loss if closure is not None else result

    def _index_of_A(self) -> list[int]:
        """The integer key torch's state_dict gives each layer's A (its position across the param groups)."""
        offsets = [0]
        for group in self.param_groups:
            offsets.append(offsets[-1] + len(group["params"]))
        return [offsets[g] + i for (g, i), _ in self._slots]

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if self._under_zero():
            # ZeRO's param_groups hold flat partitions, not A's: the layers' status goes under a key of its own,
            # which DeepSpeed saves and loads with the rest of this dict
            return {**state_dict, ZERO_STATE_KEY: {
                "layers": [pair.name for pair in self._lora_pairs],
                **{key: torch.stack([s[key] for s in self._layer_state]).cpu() for key in _STATE_DTYPES}}}
        packed = dict(state_dict["state"])
        for layer, index in enumerate(self._index_of_A()):
            # A new dict: the base's entry is the live self.state[A], which must not gain our keys.
            packed[index] = {**packed.get(index, {}), **{k: v.clone() for k, v in self._layer_state[layer].items()}}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if ZERO_STATE_KEY in state_dict:
            self._load_zero_state_dict(state_dict)
            return
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
        missing = 0
        for layer, position in enumerate(self._index_of_A()):
            saved = ours.get(saved_keys[position], {})
            lora_A = self._live_factors(layer)[0]
            if set(saved) != set(_STATE_DTYPES):
                missing += 1
                saved = self._fresh_layer_state(lora_A)
            device = local_tensor(lora_A).device
            self._layer_state[layer] = {name: local_tensor(value).to(device=device, dtype=_STATE_DTYPES[name]).clone()
                                        for name, value in saved.items()}
        if missing:
            warnings.warn(
                f"The loaded optimizer state has no Stable-LoRA status for {missing} of {len(self._lora_pairs)} "
                "LoRA layer(s): it was saved by a plain optimizer. Those layers start shrinking afresh.",
                stacklevel=2,
            )
        self._shrinking_layers = [i for i, s in enumerate(self._layer_state) if bool(s[SHRINKING_KEY])]
        self._buckets = None
        self._steps_shrunk = 0

    def _load_zero_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict[ZERO_STATE_KEY]
        names = [pair.name for pair in self._lora_pairs]
        if saved["layers"] != names:
            raise ValueError(f"The loaded optimizer state is for {len(saved['layers'])} LoRA layer(s) "
                             f"({saved['layers'][:2]}...), this model has {len(names)} ({names[:2]}...): load a "
                             "checkpoint of the same model and adapter.")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != ZERO_STATE_KEY})
        device = master_slice(self._lora_pairs[0].lora_A).device
        self._layer_state = [{key: saved[key][i].to(device=device, dtype=dtype).clone()
                              for key, dtype in _STATE_DTYPES.items()} for i in range(len(names))]
        self._shrinking_layers = [i for i, s in enumerate(self._layer_state) if bool(s[SHRINKING_KEY])]
        self._buckets = None
        self._steps_shrunk = 0
        self._zero_stepped = set()

    def stable_lora_status(self) -> list[LayerStatus]:
        """Per-layer status, for logs and diagnostics. Reads device values, so it syncs: call it at log time."""
        return [
            LayerStatus(name=pair.name, module=pair.module_name, adapter=pair.adapter, in_features=pair.in_features,
                        out_features=pair.out_features, shrinking=bool(state[SHRINKING_KEY]),
                        shrink_steps=int(state[SHRINK_STEPS_KEY]))
            for pair, state in zip(self._lora_pairs, self._layer_state)
        ]

    def shrink_has_run(self) -> bool:
        """Whether the Stable-LoRA half of a step has run since the optimizer was built or loaded (or nothing is
        left to shrink): what StableLoRAGuard checks after the first step."""
        return self._steps_shrunk > 0 or not self._shrinking_layers

    @property
    def lora_pairs(self) -> list[LoraPair]:
        return list(self._lora_pairs)

    @property
    def all_stopped(self) -> bool:
        """True once the host has dropped every layer; from then on step() adds nothing."""
        return not self._shrinking_layers


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
