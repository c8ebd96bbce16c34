"""The paper's algorithm as plainly as it can be written, independent of the library: the oracle the optimizer tests
compare against, and the per-layer loop whose cost benchmarks/optimizer_overhead.py measures."""

from __future__ import annotations

import torch
from torch import nn


class ReferenceStableLoRA:
    """A deliberately plain re-implementation of the paper's algorithm, independent of the library.

    Pairs by parameter-name substitution, one Python flag per layer, one norm per tensor, then the base step.
    """

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, shrink_ratio: float):
        params = dict(model.named_parameters())
        self.pairs = {}
        for name, a in params.items():
            for a_key, b_key in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
                if f".{a_key}." in name and a.requires_grad:
                    self.pairs[name] = (a, params[name.replace(f".{a_key}.", f".{b_key}.")])
        self.base = base
        self.shrink_ratio = shrink_ratio
        self.shrinking = dict.fromkeys(self.pairs, True)
        self.stop_step = dict.fromkeys(self.pairs)
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for name, (a, b) in self.pairs.items():
            if not self.shrinking[name]:
                continue
            if a.norm() < (a.numel() / b.numel()) * b.norm():
                self.shrinking[name] = False
                self.stop_step[name] = self.t
            else:
                a.mul_(1 - self.shrink_ratio)
        self.base.step()

    def zero_grad(self):
        self.base.zero_grad()
