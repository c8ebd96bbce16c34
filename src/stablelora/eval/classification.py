"""Accuracy of a sequence-classification model."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_classification(model, collate, examples: list[dict], batch_size: int = 64) -> dict:
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for start in tqdm(range(0, len(examples), batch_size), desc="classification eval", unit="batch", leave=False):
        batch = collate(examples[start : start + batch_size])
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        hits += (logits.argmax(-1).cpu() == labels).sum().item()
    counts = torch.bincount(torch.tensor([ex["label"] for ex in examples]))
    return {"accuracy": hits / len(examples), "majority": counts.max().item() / len(examples),
            "examples": len(examples)}
