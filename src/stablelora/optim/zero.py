"""Stable-LoRA under DeepSpeed ZeRO-1/2/3: shrink the fp32 master of each A, where ZeRO keeps it.

ZeRO hands the wrapped optimizer one flat fp32 partition per parameter group and copies it back over the model's
weights after every step, so shrinking the model's own ``lora_A`` would be undone. What the optimizer updates is
the master: ZeRO-1/2 expose each parameter's slice of it as ``param._hp_mapping.hp_fragment`` (no mapping on a
rank that holds none of it), ZeRO-3 through ``deepspeed.utils.safe_get_local_fp32_param``. The stop rule needs
whole-factor norms, so the squared norms of the local slices are summed over the data-parallel group (one
all-reduce per step) and every rank takes the same stop decisions.

ZeRO calls the wrapped ``step()`` once per parameter group (ZeRO-1/2) or sub-group (ZeRO-3) of one engine step.
The shrink runs in the first of those calls, before any update: the call whose parameters were already stepped
since the last shrink starts a new engine step. A step ZeRO skips (fp16 overflow) calls no wrapped step at all,
so it neither shrinks nor counts.

``check_zero_config`` refuses the ZeRO settings under which a user's optimizer is silently replaced, or under
which the per-parameter slices point at other parameters' values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def zero_stage(param: torch.Tensor) -> int | None:
    """3 for a ZeRO-3 partitioned parameter, 2 for one linked to a ZeRO-1/2 fp32 partition, else None."""
    if hasattr(param, "ds_id"):
        return 3
    if hasattr(param, "_dp_group"):  # DeepSpeed's link_hp_params sets it on every parameter of a ZeRO-1/2 group
        return 2
    return None


def master_slice(param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``param``'s fp32 master: a view, so scaling it in place scales what ZeRO trains.
    Empty where this rank holds none of it."""
    if zero_stage(param) == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param)
        optimizer = param._z3_optimizer
        group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
        master = optimizer.fp32_partitioned_groups_flat[group]
        if local.data_ptr() != master.narrow(0, offset, numel).data_ptr():
            raise ValueError("Stable-LoRA under DeepSpeed ZeRO-3: the fp32 master of a LoRA factor lives on another "
                             "device than the one that computes (offload_optimizer), and DeepSpeed gives only a copy "
                             "of it, which the shrink cannot reach. Use ZeRO-3 without offload_optimizer, or ZeRO-2 "
                             "with it (and \"zero_force_ds_cpu_optimizer\": false).")
        return local
    mapping = param._hp_mapping
    if mapping is None or mapping.hp_fragment is None:
        return torch.zeros(0, dtype=torch.float32, device=param.device)
    return mapping.hp_fragment


def data_parallel_group(param: torch.Tensor):
    return param.ds_process_group if zero_stage(param) == 3 else param._dp_group


def global_norms_of_slices(slices_a: list[torch.Tensor], slices_b: list[torch.Tensor], group) -> tuple:
    """Frobenius norms of whole A's and B's from this rank's slices: one all-reduce for all of them."""
    squares = torch.stack(torch._foreach_norm(slices_a + slices_b)).float().square()
    dist.all_reduce(squares, group=group)
    norms = squares.sqrt()
    return norms[: len(slices_a)], norms[len(slices_a):]


def check_zero_config(config: dict[str, Any]) -> None:
    """Refuse, before training, the ZeRO settings under which Stable-LoRA would silently not run (or run on the
    wrong values), each with the change that makes it work."""
    zero = config.get("zero_optimization") or {}
    if "optimizer" in config:
        raise ValueError(
            "Stable-LoRA under DeepSpeed: the DeepSpeed config has an \"optimizer\" block, so Trainer builds "
            "DeepSpeed's own optimizer and never calls Stable-LoRA's (training would be plain). Remove the "
            "\"optimizer\" block; the learning rate, betas, eps and weight decay then come from TrainingArguments."
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise ValueError(
            f"Stable-LoRA under DeepSpeed: offload_optimizer (device {offload!r}) makes Accelerate replace the "
            "optimizer by DeepSpeedCPUAdam, so Stable-LoRA would never step. Add \"zero_force_ds_cpu_optimizer\": "
            "false at the top level of the DeepSpeed config (the optimizer then runs on the offloaded fp32 "
            "partitions), or turn offload_optimizer off."
        )
    if zero.get("round_robin_gradients"):
        raise ValueError(
            "Stable-LoRA under DeepSpeed: zero_optimization.round_robin_gradients is true. With it, DeepSpeed's "
            "per-parameter view of the fp32 master points at other parameters' slices, so the shrink would scale the "
            "wrong values. Set \"round_robin_gradients\": false (it only reorders gradient partitions for speed)."
        )
