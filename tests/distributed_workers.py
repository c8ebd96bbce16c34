"""Workers for tests/test_distributed.py (spawned processes import this module by name)."""

from __future__ import annotations

import faulthandler
import functools
import gc
import multiprocessing
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from stablelora import create_stablelora_optimizer
from tiny import tiny_llama_peft

STEPS, GLOBAL_BATCH, SHRINK, LR = 24, 8, 0.2, 1e-2


# a rank here needs 5-40 s; one that waits this long for a peer raises instead of hanging the test run
COLLECTIVE_TIMEOUT = timedelta(seconds=180)
RANK_DEADLINE_S = COLLECTIVE_TIMEOUT.total_seconds() + 30  # past this a rank prints its stacks and exits


def spawned(worker):
    """One rank of a spawned test, run so that gloo cannot hang the test run. Garbage collection is off (a
    collection that freed a finished gloo work object on the main thread, while gloo's own thread waited for the
    GIL, hung a rank). The rank always ends with a hard exit, after success and after an error alike: the process
    group's destructor, run at interpreter exit with the GIL held, can join gloo's thread forever, and a rank that
    never exits keeps ``torch.multiprocessing`` waiting. A rank still running after RANK_DEADLINE_S prints every
    thread's stack and exits. Called in the test process itself (one rank, no spawn), it is a plain call."""

    @functools.wraps(worker)
    def run(*args):
        if multiprocessing.parent_process() is None:
            return worker(*args)
        gc.disable()
        faulthandler.dump_traceback_later(RANK_DEADLINE_S, exit=True)
        code = 0
        try:
            worker(*args)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return run


def global_batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (GLOBAL_BATCH, 10), generator=g) for _ in range(STEPS)]


def train(model, opt, batches, rank: int = 0, world: int = 1, start: int = 0, stop: int = STEPS) -> list[int]:
    """Train; returns, per step, how many layers the host still tracks (each rank saves its own list, and the test
    checks they are equal: ranks that disagree would all-reduce norm vectors of different lengths)."""
    opt.HOST_CHECK_EVERY = 3  # a short cadence, so membership changes several times within the run
    tracked = []
    for ids in batches[start:stop]:
        local = ids.chunk(world)[rank]
        opt.zero_grad()
        model(input_ids=local, labels=local).loss.backward()
        opt.step()
        tracked.append(len(opt._shrinking_layers))
    return tracked


def single_process_reference() -> dict:
    model = tiny_llama_peft()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=SHRINK, lr=LR)
    train(model, opt, global_batches())
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "stops": [s.stop_step for s in opt.stable_lora_status()]}


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), STABLELORA_CHECK_REPLICAS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


@spawned
def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, world, port)
    model = DistributedDataParallel(tiny_llama_peft())
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=SHRINK, lr=LR)
    tracked = train(model, opt, global_batches(), rank, world)
    torch.save(tracked, f"{out}.tracked{rank}")
    if rank == 0:
        torch.save({"tracked": tracked,
                    "params": {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()
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


@spawned
def fsdp2_worker(rank: int, world: int, port: int, out: str, ckpt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    batches = global_batches()
    half = STEPS // 2

    model = _fsdp2_model(world)
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=SHRINK, lr=LR)
    local_shapes = {tuple(p.to_local().shape) for n, p in model.named_parameters() if "lora_A" in n}
    tracked = train(model, opt, batches, rank, world, 0, half)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    at_half = [s.stop_step for s in opt.stable_lora_status()]
    tracked += train(model, opt, batches, rank, world, half, STEPS)
    torch.save(tracked, f"{out}.tracked{rank}")
    straight = {"params": _full_params(model), "stops": [s.stop_step for s in opt.stable_lora_status()],
                "tracked": tracked}

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


def _let_accelerate_use_fsdp_on_cpu() -> None:
    """Accelerate never upgrades a multi-CPU (gloo) state to FSDP, although FSDP2 itself runs on CPU. This is the
    one patch: a MULTI_CPU state given an FSDP plugin becomes FSDP, so Trainer takes its real FSDP2 path
    (optimizer built first, then ``fully_shard`` and Accelerate's parameter swap)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init


TRAINER_STEPS, TRAINER_BATCH = 16, 8


@spawned
def trainer_worker(rank: int, world: int, port: int, out: str) -> None:
    """HF Trainer + the factory + StabilityMonitor, as a user writes it; FSDP2 through Accelerate when world > 1."""
    from transformers import Trainer, TrainingArguments

    from stablelora import StableLoRAOptimizerFactory
    from stablelora.diagnostics.monitor import StabilityMonitor
    from stablelora.train.data import CausalCollator, ListDataset
    from tiny import token_items

    args = dict(output_dir=f"{out}.trainer", max_steps=TRAINER_STEPS, per_device_train_batch_size=TRAINER_BATCH // world,
                learning_rate=LR, seed=0, use_cpu=True, report_to="none", logging_steps=1,
                remove_unused_columns=False, disable_tqdm=True, save_strategy="no",
                ddp_timeout=int(COLLECTIVE_TIMEOUT.total_seconds()))
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        _let_accelerate_use_fsdp_on_cpu()
        args.update(fsdp="full_shard", fsdp_config={"version": 2,
                                                     "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    model = tiny_llama_peft()
    collate = CausalCollator(0)
    monitor = StabilityMonitor(model, collate(token_items(2, seed=5)), every=4)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=ListDataset(token_items(8 * 16)),
                      data_collator=collate, callbacks=[monitor],
                      optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory,
                                                {"lr": LR, "weight_decay": 0.01, "shrink_ratio": SHRINK}))
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    lora = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save({"params": lora, "stops": [s.stop_step for s in optimizer.stable_lora_status()],
                    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                    "sharded": type(optimizer.param_groups[0]["params"][0]).__name__,
                    "monitor": [[(l["a_norm"], l["b_norm"], l.get("delta1"), l.get("shrinking")) for l in r["layers"]]
                                for r in monitor.records]}, out)
    if world > 1:
        dist.destroy_process_group()


@spawned
def fsdp2_pairing_method_worker(rank: int, world: int, port: int, out: str, method: str) -> None:
    """StableLoRATrainer with a method that pairs A with B at build time, under Accelerate FSDP2."""
    from transformers import TrainingArguments

    from stablelora.methods import MethodArguments
    from stablelora.train.data import CausalCollator, ListDataset
    from stablelora.train.trainer import StableLoRATrainer
    from tiny import token_items

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _let_accelerate_use_fsdp_on_cpu()
    args = TrainingArguments(output_dir=f"{out}.trainer", max_steps=2, per_device_train_batch_size=2, learning_rate=LR,
                             use_cpu=True, report_to="none", remove_unused_columns=False, disable_tqdm=True,
                             save_strategy="no", ddp_timeout=int(COLLECTIVE_TIMEOUT.total_seconds()),
                             fsdp="full_shard", fsdp_config={"version": 2,
                                                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    trainer = StableLoRATrainer(model=tiny_llama_peft(), args=args, train_dataset=ListDataset(token_items(8)),
                                data_collator=CausalCollator(0), method=MethodArguments(optimizer=method))
    try:
        trainer.train()
        outcome = "trained"
    except ValueError as err:
        outcome = str(err)
    if rank == 0:
        torch.save(outcome, out)
    dist.destroy_process_group()


@spawned
def stablelora_train_fsdp2_worker(rank: int, world: int, port: int, out: str) -> None:
    """``stablelora train``'s run_training on the demo's real model, sharded by Accelerate FSDP2."""
    from stablelora.train.config import load_config
    from stablelora.train.run import run_training

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _let_accelerate_use_fsdp_on_cpu()
    cfg = load_config("configs/minilm_privacyqa.yaml", [
        "data.eval_size=16", "training.max_steps=4", "training.save_steps=2", "training.disable_tqdm=true",
        "monitor.every=2", "training.fsdp=full_shard", f"training.ddp_timeout={int(COLLECTIVE_TIMEOUT.total_seconds())}",
        'training.fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"], '
        '"state_dict_type": "SHARDED_STATE_DICT"}'], output_dir=out)
    run_training(cfg)
