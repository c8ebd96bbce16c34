"""Optimizer-step overhead of Stable-LoRA over its base optimizer, measured side by side in one process.

Model: a Llama-shaped decoder with LoRA on all linear layers (default: Qwen2.5-0.5B shapes, 24 layers x 7 = 168
LoRA pairs, r=8). Only ``optimizer.step()`` is timed, with fixed random gradients, in two regimes:
  shrinking - B = 0 and lr = 0, so every layer keeps shrinking on every step (the costliest regime);
  stopped   - B large, so every layer stops on the first (untimed) step; after that Stable-LoRA should cost nothing.
The optimizers are interleaved round by round (order alternating; a round is --steps steps of each) and each
ratio is a ratio of medians over rounds. Also reports the floor of any per-step stop check (read every A and B once
with two batched norms), the per-layer Python loop of the authors' snippet (tests/reference.py, the oracle the tests
check the optimizer against), and optimizer-state bytes.
Both the default torch AdamW (what HF Trainer's adamw_torch uses) and fused AdamW are measured as bases.

    python benchmarks/optimizer_overhead.py [--device cuda] [--out benchmarks/results/optimizer_overhead.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from recording import append_result  # benchmarks/recording.py (run as python benchmarks/X.py)
from stablelora import create_stablelora_optimizer, find_lora_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import ReferenceStableLoRA  # noqa: E402 - the loop the tests check the optimizer against


def build_model(args) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=256,
    )
    with torch.device("meta"):  # the frozen base weights play no part in an optimizer step: never initialise them
        base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    model.to_empty(device=args.device)  # allocated, not initialised: only the LoRA factors are given values
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.02)
                p.grad = torch.randn_like(p) * 1e-3
    return model


def state_bytes(opt: torch.optim.Optimizer) -> int:
    sd = opt.state_dict()
    return sum(v.numel() * v.element_size() for s in sd["state"].values() for v in s.values() if torch.is_tensor(v))


def synchronize(device: str) -> None:
    """Wait for queued device work, so a timing covers the steps themselves (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt, steps: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


class ReadOnceFloor:
    """The physical floor of any stop check: read every A and B once (two batched norms), then the base step."""

    def __init__(self, model, base):
        pairs = find_lora_pairs(model)
        self.lora_A, self.lora_B = [p.lora_A for p in pairs], [p.lora_B for p in pairs]
        self.base = base

    @torch.no_grad()
    def step(self):
        torch._foreach_norm(self.lora_A)
        torch._foreach_norm(self.lora_B)
        self.base.step()


def measure(args, regime: str, fused: bool) -> dict:
    models = {k: build_model(args) for k in ("base", "stable", "loop", "floor")}
    lr = 0.0 if regime == "shrinking" else 1e-4
    for model in models.values():
        with torch.no_grad():
            for pair in find_lora_pairs(model):
                pair.lora_B.copy_(torch.zeros_like(pair.lora_B) if regime == "shrinking" else torch.ones_like(pair.lora_B))
    trainable = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    kwargs = dict(lr=lr, weight_decay=0.01, fused=fused or None)
    opts = {
        "base": torch.optim.AdamW(trainable["base"], **kwargs),
        "stable": create_stablelora_optimizer(models["stable"], torch.optim.AdamW, shrink_ratio=5e-4, **kwargs),
        "loop": ReferenceStableLoRA(models["loop"], torch.optim.AdamW(trainable["loop"], **kwargs), 5e-4),
        "floor": ReadOnceFloor(models["floor"], torch.optim.AdamW(trainable["floor"], **kwargs)),
    }
    # warm-up: initialises Adam state; in 'stopped' every layer stops at once and the host drops them at its second
    # check, after 2 x HOST_CHECK_EVERY steps
    for opt in opts.values():
        for _ in range(2 * opts["stable"].HOST_CHECK_EVERY):
            opt.step()
    if regime == "stopped":
        assert opts["stable"].all_stopped
    else:
        assert all(s.shrinking for s in opts["stable"].stable_lora_status())
    per_round = {k: [] for k in opts}
    for r in range(args.rounds):
        order = list(opts) if r % 2 == 0 else list(reversed(opts))
        for k in order:
            per_round[k].append(time_steps(opts[k], args.steps, args.device))
    ratio = lambda k: statistics.median(per_round[k]) / statistics.median(per_round["base"])  # noqa: E731
    return {
        "regime": regime,
        "base_name": "AdamW(fused=True)" if fused else "AdamW (default)",
        "floor_ratio": ratio("floor"),
        "base_ms": 1e3 * statistics.median(per_round["base"]),
        "stable_ms": 1e3 * statistics.median(per_round["stable"]),
        "loop_ms": 1e3 * statistics.median(per_round["loop"]),
        "stable_ratio": ratio("stable"),
        "loop_ratio": ratio("loop"),
        "base_state": state_bytes(opts["base"]),
        "stable_state": state_bytes(opts["stable"]),
        "layers": len(find_lora_pairs(models["stable"])),
        "trainable": sum(p.numel() for p in trainable["stable"]),
    }


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per timed round")
    parser.add_argument("--device", default="cpu", help="where the LoRA factors live: cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", help="append a Markdown record (figures + command + versions) to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    rows = [measure(args, regime, fused) for fused in (False, True) for regime in ("shrinking", "stopped")]
    layers, trainable = rows[0]["layers"], rows[0]["trainable"]
    lines = [
        f"LoRA pairs: {layers}, trainable parameters: {trainable:,}, device: {_device_name(args.device)}, "
        f"torch threads: {torch.get_num_threads()}",
        "",
        "| base | regime | base step (ms) | Stable-LoRA step (ms) | **Stable-LoRA / base** | read-A-and-B-once "
        "floor / base | authors'-style per-layer loop / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['base_name']} | {r['regime']} | {r['base_ms']:.2f} | {r['stable_ms']:.2f} | "
            f"**{r['stable_ratio']:.3f}x** | {r['floor_ratio']:.3f}x | {r['loop_ratio']:.3f}x |"
        )
    base_state, stable_state = rows[0]["base_state"], rows[0]["stable_state"]
    extra = stable_state - base_state
    lines += [
        "",
        f"Optimizer state: AdamW {base_state:,} B, Stable-LoRA {stable_state:,} B; extra {extra:,} B = "
        f"{extra / layers:.0f} B per LoRA layer (flag + step count) = {extra / trainable:.2e} B per parameter.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        append_result(args.out, "optimizer_overhead.py", argv, report)

if __name__ == "__main__":
    main()
