"""stablelora: stable LoRA fine-tuning (Stable-LoRA, arXiv 2603.05204) for PEFT models, and the tools to prove it.

The optimizer names below are imported on first use, so `stablelora train` can check a config (and refuse a typo)
before torch is imported."""

import importlib

__version__ = "0.1.0"

__all__ = ["LayerStatus", "LoraPair", "StableLoRAOptimizerFactory", "__version__", "create_stablelora_optimizer",
           "find_lora_pairs"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("stablelora.optim"), name)
    raise AttributeError(f"module 'stablelora' has no attribute {name!r}")
