"""Workers for tests/test_distributed.py (spawned processes import this module by name)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from stablelora import create_stablelora_optimizer
from tiny import tiny_llama_peft

STEPS, GLOBAL_BATCH, SHRINK, LR = 24, 8, 0.2, 1e-2


def global_batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (GLOBAL_BATCH, 10), generator=g) for _ in range(STEPS)]


def train(model, opt, batches, rank: int = 0, world: int = 1, start: int = 0, stop: int = STEPS) -> None:
    for ids in batches[start:stop]:
        local = ids.chunk(world)[rank]
        opt.zero_grad()
        model(input_ids=local, labels=local).loss.backward()
        opt.step()


def single_process_reference() -> dict:
    model = tiny_llama_peft()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=SHRINK, lr=LR)
    train(model, opt, global_batches())
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "stops": [s.stop_step for s in opt.stable_lora_status()]}


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), STABLELORA_CHECK_REPLICAS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, world, port)
    model = DistributedDataParallel(tiny_llama_peft())
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=SHRINK, lr=LR)
    train(model, opt, global_batches(), rank, world)
    if rank == 0:
        torch.save({"params": {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()
                               if p.requires_grad},
                    "stops": [s.stop_step for s in opt.stable_lora_status()],
                    "names": [s.name for s in opt.stable_lora_status()]}, out)
    dist.destroy_process_group()


def _fsdp2_model(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama_peft()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_params(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in full.items() if n in trainable}


def fsdp2_worker(rank: int, world: int, port: int, out: str, ckpt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    batches = global_batches()
    half = STEPS // 2

    model = _fsdp2_model(world)
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=SHRINK, lr=LR)
    local_shapes = {tuple(p.to_local().shape) for n, p in model.named_parameters() if "lora_A" in n}
    train(model, opt, batches, rank, world, 0, half)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    at_half = [s.stop_step for s in opt.stable_lora_status()]
    train(model, opt, batches, rank, world, half, STEPS)
    straight = {"params": _full_params(model), "stops": [s.stop_step for s in opt.stable_lora_status()]}

    resumed = _fsdp2_model(world)
    with torch.no_grad():  # the adapter must come from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.to_local().normal_()
    resumed_opt = create_stablelora_optimizer(resumed, torch.optim.AdamW, shrink_ratio=SHRINK, lr=LR)
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    after_load = [s.stop_step for s in resumed_opt.stable_lora_status()]
    train(resumed, resumed_opt, batches, rank, world, half, STEPS)
    again = {"params": _full_params(resumed), "stops": [s.stop_step for s in resumed_opt.stable_lora_status()]}
    if rank == 0:
        torch.save({"straight": straight, "resumed": again, "at_half": at_half, "after_load": after_load,
                    "local_shapes": sorted(local_shapes)}, out)
    dist.destroy_process_group()
