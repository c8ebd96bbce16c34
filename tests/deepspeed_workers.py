"""Ranks for tests/test_deepspeed.py: HF Trainer + Stable-LoRA under DeepSpeed ZeRO (or DDP) on 2 gloo processes.

Spawned processes import this module by name. Trainer builds the optimizer (``use_stable_lora``), DeepSpeed wraps
it as it does for every user: nothing here reaches around Trainer, Accelerate or DeepSpeed, except the one
CPU-only fix below.
"""

from __future__ import annotations

import os

import torch

from distributed_workers import COLLECTIVE_TIMEOUT, spawned

STEPS, BATCH, SHRINK, LR = 12, 8, 0.2, 1e-2


def zero_config(stage: int, bf16: bool = False, **zero: object) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {}),
                                  **zero},
            "bf16": {"enabled": bf16}}


def _distributed_cpu_state(rank: int, world: int, port: int, deepspeed: bool) -> None:
    """Without CUDA, Accelerate records one process on the DeepSpeed path (it passes no backend), and DeepSpeed
    then trains both ranks on the same batches. Building the shared state with the gloo backend first, while
    Accelerate is told DeepSpeed is on, gives two real ranks; Trainer then uses that state."""
    from accelerate import PartialState

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def _lora_masters(model, zero: bool) -> dict[str, torch.Tensor]:
    """Every LoRA factor's whole fp32 value: ZeRO's master (gathered: a collective), or the parameter itself."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: (safe_get_full_fp32_param(p) if zero else p).detach().float().clone()
            for n, p in model.named_parameters() if p.requires_grad}


@spawned
def trainer_worker(rank: int, world: int, port: int, out: str, config: dict | None, shrink: float = SHRINK, save_at: int = 0,
                   resume: str | None = None) -> None:
    from transformers import Trainer, TrainingArguments

    from stablelora.optim.zero import master_slice
    from stablelora.train.data import CausalCollator, ListDataset
    from stablelora.train.guard import use_stable_lora, wrapped_chain
    from tiny import tiny_llama_peft, token_items

    _distributed_cpu_state(rank, world, port, deepspeed=config is not None)
    bf16 = config is not None and config["bf16"]["enabled"]
    if bf16:  # TrainingArguments refuses bf16 without a GPU: enabled in DeepSpeed's config after the check
        config = {**config, "bf16": {"enabled": False}}
    args = TrainingArguments(
        output_dir=f"{out}.trainer", max_steps=STEPS, per_device_train_batch_size=BATCH // world,
        learning_rate=LR, weight_decay=0.01, max_grad_norm=0.0, average_tokens_across_devices=False,
        train_sampling_strategy="sequential", seed=0, report_to="none", logging_steps=1,
        remove_unused_columns=False, disable_tqdm=True, save_strategy="steps" if save_at else "no",
        save_steps=save_at or 500, save_only_model=False, ddp_timeout=int(COLLECTIVE_TIMEOUT.total_seconds()),
        **(dict(deepspeed=config, accelerator_config={"use_configured_state": True}) if config is not None else
           dict(use_cpu=True)))
    if bf16:
        args.hf_deepspeed_config.config["bf16"]["enabled"] = True
    model = tiny_llama_peft()
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(token_items(BATCH * STEPS)),
                      data_collator=CausalCollator(0))
    use_stable_lora(trainer, shrink_ratio=shrink)
    first_batch = next(iter(trainer.get_train_dataloader()))["input_ids"]
    trainer.train(resume_from_checkpoint=resume)
    optimizer = trainer.optimizer
    while not hasattr(optimizer, "stable_lora_status"):  # Accelerate's wrapper, then DeepSpeed's ZeRO optimizer
        optimizer = optimizer.optimizer
    zero = config is not None
    masters = _lora_masters(model, zero)
    result = {"masters": masters, "stops": [s.stop_step for s in optimizer.stable_lora_status()],
              "first_batch": first_batch,
              "slices": {n: master_slice(p).numel() if zero else p.numel()
                         for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n},
              "model_dtype": str(next(p for p in model.parameters() if p.requires_grad).dtype),
              "wrapped": [type(o).__name__ for o in wrapped_chain(trainer.optimizer)]}
    torch.save(result, f"{out}.rank{rank}")
    torch.distributed.destroy_process_group()




def _refusal(scenario) -> str:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # one Trainer per scenario; Accelerate allows one DeepSpeed plugin per state
    try:
        scenario()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error: the run trained"


@spawned
def refusal_worker(rank: int, world: int, port: int, out: str) -> None:
    """Every way a DeepSpeed run silently drops Stable-LoRA, on one rank: each must stop before training."""
    from transformers import Trainer, TrainingArguments

    from stablelora import StableLoRAOptimizerFactory, create_stablelora_optimizer
    from stablelora.methods import MethodArguments
    from stablelora.train.data import CausalCollator, ListDataset
    from stablelora.train.guard import StableLoRAGuard, use_stable_lora
    from stablelora.train.trainer import StableLoRATrainer
    from tiny import tiny_llama_peft, token_items

    _distributed_cpu_state(rank, world, port, deepspeed=True)
    # torch's AdamW: DeepSpeed's own would JIT-compile its fused_adam op (minutes on these CPUs)
    optimizer_block = {**zero_config(2), "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}
    offload = zero_config(2, offload_optimizer={"device": "cpu"})
    round_robin = zero_config(2, round_robin_gradients=True)

    def trainer(config, cls=Trainer, **kwargs):
        args = TrainingArguments(output_dir=f"{out}.trainer", max_steps=2, per_device_train_batch_size=4,
                                 learning_rate=LR, report_to="none", disable_tqdm=True, save_strategy="no",
                                 remove_unused_columns=False, deepspeed=config,
                                 accelerator_config={"use_configured_state": True})
        return cls(model=kwargs.pop("model", None) or tiny_llama_peft(), args=args,
                   train_dataset=ListDataset(token_items(16)), data_collator=CausalCollator(0), **kwargs)

    factory = (StableLoRAOptimizerFactory, {"lr": LR, "shrink_ratio": SHRINK})

    def prebuilt():
        model = tiny_llama_peft()
        opt = create_stablelora_optimizer(model, shrink_ratio=SHRINK, lr=LR)
        trainer(zero_config(2), model=model, optimizers=(opt, None), callbacks=[StableLoRAGuard()]).train()

    results = {
        "use_stable_lora, optimizer block": _refusal(lambda: use_stable_lora(trainer(optimizer_block))),
        "use_stable_lora, offload": _refusal(lambda: use_stable_lora(trainer(offload))),
        "use_stable_lora, round robin": _refusal(lambda: use_stable_lora(trainer(round_robin))),
        "mixin, optimizer block": _refusal(lambda: trainer(optimizer_block, StableLoRATrainer,
                                                           method=MethodArguments(optimizer="stable-lora")).train()),
        "mixin, lora-rite": _refusal(lambda: trainer(zero_config(2), StableLoRATrainer,
                                                     method=MethodArguments(optimizer="lora-rite")).train()),
        "mixin, riemannian": _refusal(lambda: trainer(zero_config(2), StableLoRATrainer,
                                                      method=MethodArguments(optimizer="riemannian")).train()),
        "factory, offload": _refusal(lambda: trainer(offload, optimizer_cls_and_kwargs=factory).train()),
        "factory with the guard, optimizer block": _refusal(lambda: trainer(
            optimizer_block, optimizer_cls_and_kwargs=factory, callbacks=[StableLoRAGuard()]).train()),
        "pre-built optimizer with the guard": _refusal(prebuilt),
    }
    torch.save(results, out)
    torch.distributed.destroy_process_group()


@spawned
def stablelora_train_worker(rank: int, world: int, port: int, out: str, resume: bool, max_steps: int) -> None:
    """``stablelora train``'s run_training on the demo's real model under DeepSpeed ZeRO-2, checkpointing every 2
    steps; with ``resume`` it continues the run in ``out``."""
    from stablelora.train.config import load_config
    from stablelora.train.run import run_training

    _distributed_cpu_state(rank, world, port, deepspeed=True)
    cfg = load_config("configs/minilm_privacyqa.yaml", [
        "data.eval_size=16", f"training.max_steps={max_steps}", "training.save_steps=2",
        "training.disable_tqdm=true", "monitor.every=2", "method.shrink_ratio=0.05",
        f"training.deepspeed={{\"zero_optimization\": {{\"stage\": 2}}, \"train_micro_batch_size_per_gpu\": \"auto\", "
        "\"train_batch_size\": \"auto\", \"gradient_accumulation_steps\": \"auto\", \"gradient_clipping\": \"auto\"}",
        'training.accelerator_config={"use_configured_state": true}',
        f"training.ddp_timeout={int(COLLECTIVE_TIMEOUT.total_seconds())}"], output_dir=out)
    run_training(cfg, resume=resume)
    torch.distributed.destroy_process_group()
