"""Optimizers: Stable-LoRA (any base optimizer) and the LoRA pairing it relies on."""

from stablelora.optim.factory import StableLoRAOptimizerFactory
from stablelora.optim.pairs import LoraPair, find_lora_pairs
from stablelora.optim.stable import LayerStatus, create_stablelora_optimizer, stable_lora_class

__all__ = ["LayerStatus", "LoraPair", "StableLoRAOptimizerFactory", "create_stablelora_optimizer", "find_lora_pairs", "stable_lora_class"]
