"""Accuracy of a model with a classification or multiple-choice head."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def head_correct(model, collate, examples: list[dict], batch_size: int, desc: str) -> int:
    """How many examples the head's argmax gets right; ``collate`` builds inputs plus ``labels``."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        batch = collate(examples[start : start + batch_size])
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        hits += (logits.argmax(-1).cpu() == labels).sum().item()
    return hits


def evaluate_classification(model, collate, examples: list[dict], batch_size: int = 64) -> dict:
    hits = head_correct(model, collate, examples, batch_size, "classification eval")
    counts = torch.bincount(torch.tensor([ex["label"] for ex in examples]))
    return {"accuracy": hits / len(examples), "majority": counts.max().item() / len(examples),
            "examples": len(examples)}
