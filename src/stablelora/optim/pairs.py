"""Find the (A, B) factor pair of every LoRA layer of a PEFT model, by module, never by list position.

The authors' snippet zips a list of A's with a list of B's; one missing or reordered entry silently pairs the
wrong matrices. Walking PEFT's ``LoraLayer`` modules instead pairs ``lora_A[adapter]`` with ``lora_B[adapter]``
of the same layer, for Linear, Conv and Embedding LoRA and for every adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Prefixes that wrappers (DDP, FSDP1, torch.compile, activation checkpointing, PEFT) put in front of module
# names. They are dropped from the names we show to users so logs read the same however the model is wrapped.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def display_name(module_name: str) -> str:
    """The module name a user recognises: wrapper prefixes removed."""
    name = module_name
    for infix in _WRAPPER_INFIXES:
        name = name.replace(infix, "")
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


@dataclass(frozen=True, eq=False)
class LoraPair:
    """One LoRA layer of one adapter: ``W = W0 + s * B @ A`` with A of shape (r, in) and B of shape (out, r).

    For Conv LoRA the trailing kernel dimensions fold into ``in_features``/``out_features``; for Embedding LoRA
    ``in_features`` is the vocabulary size. Sizes are global: ``numel`` is the whole tensor's under FSDP2, and
    DeepSpeed ZeRO-3, which empties a partitioned parameter, keeps its shape in ``ds_shape``.
    """

    module_name: str
    adapter: str
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    @property
    def rank(self) -> int:
        return _global_shape(self.lora_A)[0]

    @property
    def in_features(self) -> int:
        return _global_shape(self.lora_A).numel() // self.rank

    @property
    def out_features(self) -> int:
        return _global_shape(self.lora_B).numel() // self.rank

    @property
    def name(self) -> str:
        """``module[adapter]``, the key used in status reports."""
        return f"{self.module_name}[{self.adapter}]"


def _global_shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


def _factor_weights(module: nn.Module) -> dict[str, tuple[nn.Parameter | None, nn.Parameter | None]]:
    """adapter -> (A, B) weights of one PEFT LoraLayer, covering Linear/Conv and Embedding LoRA."""
    from peft.tuners.lora import LoraLayer

    assert isinstance(module, LoraLayer)
    factors: dict[str, tuple[nn.Parameter | None, nn.Parameter | None]] = {}
    for adapter in set(module.lora_A.keys()) | set(module.lora_B.keys()):
        a = module.lora_A[adapter].weight if adapter in module.lora_A else None
        b = module.lora_B[adapter].weight if adapter in module.lora_B else None
        factors[adapter] = (a, b)
    for adapter in set(module.lora_embedding_A.keys()) | set(module.lora_embedding_B.keys()):
        a = module.lora_embedding_A[adapter] if adapter in module.lora_embedding_A else None
        b = module.lora_embedding_B[adapter] if adapter in module.lora_embedding_B else None
        factors[adapter] = (a, b)
    return factors


def find_lora_pairs(model: nn.Module) -> list[LoraPair]:
    """Every trainable (A, B) pair of ``model``, in module order.

    Pairs whose A and B are both frozen (an inactive adapter) are skipped. A trainable factor without its
    partner, or with a frozen partner, is an error: shrinking it alone would not be Stable-LoRA.
    Raises ``ValueError`` when the model has no LoRA layer at all or none is trainable.
    """
    from peft.tuners.lora import LoraLayer

    pairs: list[LoraPair] = []
    seen_lora_layer = False
    paired_ids: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        seen_lora_layer = True
        shown = display_name(module_name)
        for adapter, (a, b) in sorted(_factor_weights(module).items()):
            if a is None or b is None:
                missing = "lora_B" if b is None else "lora_A"
                raise ValueError(
                    f"LoRA layer '{shown}' adapter '{adapter}' has no {missing}: Stable-LoRA needs both factors "
                    "of every LoRA layer. Build the adapter with peft.get_peft_model / add_adapter rather than "
                    "editing lora_A/lora_B by hand."
                )
            if not a.requires_grad and not b.requires_grad:
                continue
            if a.requires_grad != b.requires_grad:
                frozen = "lora_A" if not a.requires_grad else "lora_B"
                raise ValueError(
                    f"LoRA layer '{shown}' adapter '{adapter}': {frozen} is frozen but its partner is trainable. "
                    "Stable-LoRA's stop rule compares both factors, so train both (requires_grad=True) or freeze "
                    "both; for A-frozen training (LoRA-FA) use peft.optimizers.create_lorafa_optimizer instead."
                )
            pairs.append(LoraPair(shown, adapter, a, b))
            paired_ids.update((id(a), id(b)))

    if not seen_lora_layer:
        raise ValueError(
            "The model has no LoRA layer. Wrap it first: model = peft.get_peft_model(model, LoraConfig(...)); "
            "Stable-LoRA shrinks the A factor of PEFT LoRA layers."
        )
    stray = [
        display_name(n)
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in paired_ids and ("lora_A" in n or "lora_embedding_A" in n)
    ]
    if stray:
        raise ValueError(
            f"Trainable LoRA A parameter(s) outside a PEFT LoRA layer, so without a B to pair with: {stray[:5]}. "
            "Stable-LoRA pairs A with B by PEFT module; use peft's LoRA layers for these modules."
        )
    if not pairs:
        raise ValueError(
            "The model has LoRA layers but none is trainable (every lora_A/lora_B has requires_grad=False). "
            "Activate the adapter to train, e.g. model.set_adapter(name) or model.train() after get_peft_model."
        )
    return pairs


def check_adapter_dtypes(pairs: list[LoraPair]) -> list[LoraPair]:
    """Refuse bf16 factors (the shrink would round away); return the fp16 ones so the caller can warn."""
    bf16 = [p.name for p in pairs if torch.bfloat16 in (p.lora_A.dtype, p.lora_B.dtype)]
    if bf16:
        raise ValueError(
            f"LoRA weights are bfloat16 in {len(bf16)} layer(s), e.g. {bf16[0]}. Multiplying a bf16 A by "
            "(1 - shrink_ratio) rounds back to A for shrink ratios below ~0.004, so Stable-LoRA would silently do "
            "nothing. Keep the adapter weights in float32: PEFT does so by default (autocast_adapter_dtype=True in "
            "get_peft_model); do not call model.to(torch.bfloat16) after adding the adapter; get bf16 speed from "
            "mixed precision instead (TrainingArguments(bf16=True) or torch.autocast)."
        )
    return [p for p in pairs if torch.float16 in (p.lora_A.dtype, p.lora_B.dtype)]
