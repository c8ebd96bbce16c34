"""Every collective Stable-LoRA needs lives here: global norms of sharded factors and replica checks.

- DDP: parameters are replicated, local norms are global norms, no communication. With
  ``STABLELORA_CHECK_REPLICAS=1`` each step also checks (one small all-reduce) that every rank took the same
  stop decisions.
- FSDP2 (``fully_shard``; Accelerate ``fsdp_version: 2``): parameters are DTensors sharded over a device mesh.
  The squared norms of the local shards are summed over the mesh dimensions that shard them (one all-reduce
  per bucket and step), sizes come from the global shapes, and the shrink multiplies the local shards. Since
  every rank then holds the same norms, every rank takes the same stop decisions.
- FSDP1 flattens parameters, so no LoRA pair can be found by module: refused with the alternative.
- DeepSpeed ZeRO flattens them too, but keeps a per-parameter view of its fp32 masters: see ``zero.py``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (the tensor itself when it is not a DTensor)."""
    dtensor = _dtensor_cls()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: gathered from every rank when FSDP2 shards it (a collective: all ranks call it)."""
    t = t.detach()
    dtensor = _dtensor_cls()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def all_ranks_min(t: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over all ranks (in place), or ``t`` itself outside a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def shard_groups(t: torch.Tensor) -> tuple:
    """Process groups over which ``t`` is sharded: its norm needs a sum over each of them."""
    dtensor = _dtensor_cls()
    if dtensor is None or not isinstance(t, dtensor):
        return ()
    return tuple(t.device_mesh.get_group(dim) for dim, placement in enumerate(t.placements)
                 if placement.is_shard())


def global_norms(local: list[torch.Tensor], groups: tuple) -> torch.Tensor:
    """Frobenius norms of sharded tensors from their local shards: one all-reduce per shard group."""
    squares = torch.stack(torch._foreach_norm(local)).square()
    for group in groups:
        dist.all_reduce(squares, group=group)
    return squares.sqrt()


def check_replicas(flags: torch.Tensor) -> None:
    """Debug mode (STABLELORA_CHECK_REPLICAS=1): every rank must hold the same stop decisions."""
    if os.environ.get("STABLELORA_CHECK_REPLICAS") != "1" or not dist.is_available() or not dist.is_initialized():
        return
    as_int = flags.to(torch.int32)
    low, high = as_int.clone(), as_int.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("Stable-LoRA: ranks disagree on which LoRA layers are still shrinking; the replicas "
                           "have diverged (different parameters or data-parallel gradients not synchronised).")


def refuse_flat_parameters(model: nn.Module) -> None:
    """FSDP1 with use_orig_params=False hides lora_A/lora_B inside FlatParameters: say what to use instead."""
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(p, FlatParameter) for p in model.parameters()):
        raise ValueError(
            "The model is wrapped by FSDP1 with use_orig_params=False: its parameters are flattened, so LoRA A and B "
            "cannot be paired by module. Use FSDP2 (torch.distributed.fsdp.fully_shard, or Accelerate with "
            "fsdp_version: 2), or FSDP1 with use_orig_params=True."
        )
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
                "The model is wrapped by FSDP1 (use_orig_params=True): its LoRA parameters are 1-D slices of flat "
                "shards whose global shapes stablelora does not reconstruct. Use FSDP2 (fully_shard, or Accelerate "
                "with fsdp_version: 2), where Stable-LoRA is exact."
            )


DEEPSPEED_MESSAGE = (
    "ZeRO replaces each parameter group by one flat fp32 partition, so a method that pairs LoRA A with B inside "
    "the optimizer never sees them. Use stable-lora or adamw (exact under ZeRO-1/2/3), or shard with FSDP2 "
    "(Accelerate config with fsdp_version: 2; see configs/accelerate/)."
)

FSDP_PAIRING_MESSAGE = (
    "this method pairs each LoRA A with its B when it is built, and FSDP2 swaps both for shards afterwards, so the "
    "pairs would never get a gradient and the run would be plain AdamW. Train it unsharded (one process or DDP), or "
    "use stable-lora or adamw under FSDP2."
)
