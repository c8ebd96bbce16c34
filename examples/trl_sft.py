"""Stable-LoRA inside TRL's SFTTrainer, on SmolLM2-135M-Instruct and GSM-Symbolic chain-of-thought.

    .venv/bin/python examples/trl_sft.py [--steps 20] [--output-dir runs/trl_sft]

The optimizer comes from StableLoRAOptimizerFactory through TRL's own `optimizer_cls_and_kwargs`: no subclass.
Trainer builds it from the model TRL trains, so the same code works when Accelerate wraps the model for DDP/FSDP2.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from stablelora import StableLoRAOptimizerFactory  # noqa: E402
from stablelora.assets.models import resolve_model  # noqa: E402
from stablelora.assets.tasks import load_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/trl_sft")
    args = parser.parse_args()

    model_dir = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = load_task("gsm-symbolic", eval_size=20, seed=0)
    data = Dataset.from_list([{"prompt": f"Question: {x['prompt']}\nAnswer:", "completion": f" {x['completion']}"}
                              for x in task.train[: 8 * args.steps]])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=SFTConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                       learning_rate=1e-3, logging_steps=5, save_strategy="no", report_to="none", use_cpu=True,
                       max_length=256, bf16=False),  # TRL defaults to bf16 autocast, very slow on CPU
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory, {"lr": 1e-3, "shrink_ratio": 0.002}),
    )
    trainer.train()
    layers = trainer.optimizer.optimizer.stable_lora_status()  # inside Accelerate's AcceleratedOptimizer
    stopped = [s.stop_step for s in layers if s.stop_step is not None]
    print(f"{len(stopped)}/{len(layers)} LoRA layers stopped shrinking; stop steps: {sorted(stopped)[:10]} ...")


if __name__ == "__main__":
    main()
