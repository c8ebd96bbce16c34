"""End-to-end training overhead of Stable-LoRA against plain AdamW LoRA on a real model, in the same process.

Two identical SmolLM2-135M-Instruct LoRA models (same seed, same init) train on the same PIQA batches, one with
`adamw` and one with `stable-lora`. Their full training steps (forward, backward, optimizer step) alternate, the
order swapped every step, so a change of machine load hits both alike. Reports the median per-step time ratio
(stable-lora / adamw), the total time ratio, how many layers were still shrinking at the end, and the optimizer-state
bytes of both (the only place the method could add memory).

    python benchmarks/train_overhead.py [--steps 40] [--targets q_proj,v_proj] [--shrink-ratio 0.0005] [--out FILE]
    python benchmarks/train_overhead.py --model qwen2.5-coder-0.5b-instruct --device cuda --bf16   # on a GPU

The paper reports +0.6 % time and no extra memory on GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from recording import append_result  # benchmarks/recording.py (run as python benchmarks/X.py)
from stablelora.assets.models import CAUSAL, resolve_model
from stablelora.methods import MethodArguments, build_optimizer
from stablelora.train.config import load_config
from stablelora.train.data import collator, load_task_data, train_items
from stablelora.train.model import build_peft_model
from stablelora.train.run import optimizer_state_bytes


def build(method: str, cfg, task, model_dir, items, collate, shrink_ratio: float, lr: float, device: torch.device):
    torch.manual_seed(0)
    model = build_peft_model(cfg, CAUSAL, task, model_dir, items, collate).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, MethodArguments(optimizer=method, shrink_ratio=shrink_ratio),
                                torch.optim.AdamW, {"lr": lr, "weight_decay": 0.01}, [{"params": params}], 0.01)
    return model, optimizer


def timed_step(model, optimizer, batch, device: torch.device, bf16: bool) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # mixed precision; adapters stay fp32
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    synchronize()
    return time.perf_counter() - started


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, caches)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--shrink-ratio", type=float, default=0.0005)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a named offline model (stablelora models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around forward (fp32 adapters)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("configs/smollm2_openbookqa.yaml",
                          ["data.dataset=piqa", "data.eval_size=10", f"lora.target_modules=[{args.targets}]",
                           f"model.name_or_path={args.model}"],
                          output_dir=tmp)
    model_dir = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = load_task_data(cfg)
    needed = (args.steps + args.warmup) * args.batch_size
    items = train_items(CAUSAL, task.family, tokenizer, task.train[:needed], cfg.data.max_length)
    collate = collator(CAUSAL, task.family, tokenizer, cfg.data.max_length)
    batches = [{k: v.to(device) for k, v in collate(items[i : i + args.batch_size]).items()}
               for i in range(0, needed, args.batch_size)]
    runs = {m: build(m, cfg, task, model_dir, items, collate, args.shrink_ratio, args.lr, device)
            for m in ("adamw", "stable-lora")}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for i, batch in enumerate(batches):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for method in order:
            elapsed = timed_step(*runs[method], batch, device, args.bf16)
            if i >= args.warmup:
                times[method].append(elapsed)
    ratios = [s / a for s, a in zip(times["stable-lora"], times["adamw"])]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    status = runs["stable-lora"][1].stable_lora_status()
    shrinking = sum(s.shrinking for s in status)
    state = {m: optimizer_state_bytes(opt) for m, (_, opt) in runs.items()}
    report = "\n".join([
        f"{args.model} on {device_name}{' (bf16 autocast)' if args.bf16 else ''}, LoRA r={cfg.lora.r} on "
        f"{args.targets} ({len(status)} layers), batch "
        f"{args.batch_size}, PIQA, lambda={args.shrink_ratio}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"interleaved:",
        f"- median step: adamw {statistics.median(times['adamw']):.3f} s, stable-lora "
        f"{statistics.median(times['stable-lora']):.3f} s",
        f"- median per-step ratio stable-lora/adamw = {statistics.median(ratios):.4f}x; total-time ratio = "
        f"{sum(times['stable-lora']) / sum(times['adamw']):.4f}x",
        f"- layers still shrinking at the end: {shrinking} of {len(status)}",
        f"- optimizer state: adamw {state['adamw']:,} B, stable-lora {state['stable-lora']:,} B "
        f"(+{state['stable-lora'] - state['adamw']:,} B = {(state['stable-lora'] - state['adamw']) / len(status):.0f} "
        "B per layer)",
    ])
    print(report)
    if args.out:
        append_result(args.out, "train_overhead.py", argv, report)

if __name__ == "__main__":
    main()
