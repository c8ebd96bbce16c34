"""stablelora: stable LoRA fine-tuning (Stable-LoRA, arXiv 2603.05204) for PEFT models, and the tools to prove it."""

from stablelora.optim import (LayerStatus, LoraPair, StableLoRAOptimizerFactory, create_stablelora_optimizer,
                              find_lora_pairs)

__version__ = "0.1.0"

__all__ = ["LayerStatus", "LoraPair", "StableLoRAOptimizerFactory", "__version__", "create_stablelora_optimizer",
           "find_lora_pairs"]
