"""Plug-ins that install Stable-LoRA into the trainers people use, each through the hook that trainer calls.

HF Trainer and TRL need none: pass ``optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory, {...})``. Each module
here imports its framework only when used, so the package imports without any of them.
"""
