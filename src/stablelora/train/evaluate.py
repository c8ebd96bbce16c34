"""A run's scores: the task's evaluator for the model kind on the eval split (and extra evals), or on the validation
split carved from train, plus the answer-token loss of math tasks (the SFT loss, a continuous metric)."""

from __future__ import annotations

import torch

from stablelora.assets.models import ENCODER
from stablelora.assets.tasks import CLASSIFICATION, MULTIPLE_CHOICE, TaskData
from stablelora.eval.classification import evaluate_classification
from stablelora.eval.math import evaluate_math
from stablelora.eval.multiple_choice import evaluate_causal_mc, evaluate_encoder_mc
from stablelora.train.config import DataArguments
from stablelora.train.data import collator, train_items


def eval_splits(task: TaskData, kind: str, validation: bool = False) -> dict[str, list[dict]]:
    """The example sets ``evaluate`` scores, by name: the eval split (or the validation split), and a generation
    task's extra evals."""
    examples = task.validation if validation else task.eval
    if kind == ENCODER or task.family == MULTIPLE_CHOICE or validation:
        return {task.name: examples}
    return {task.name: examples, **task.extra_eval}


def evaluate(model, task: TaskData, kind: str, tokenizer, data: DataArguments, validation: bool = False) -> dict:
    """Scores on the eval split (and extra evals), or on the validation split carved from train."""
    examples = task.validation if validation else task.eval
    collate = collator(kind, task.family, tokenizer, data.max_length)
    if kind == ENCODER:
        fn = evaluate_classification if task.family == CLASSIFICATION else evaluate_encoder_mc
        return {task.name: fn(model, collate, examples, batch_size=data.eval_batch_size)}
    if task.family == MULTIPLE_CHOICE:
        return {task.name: evaluate_causal_mc(model, tokenizer, examples, max_length=data.max_length,
                                              batch_size=data.eval_batch_size)}
    results = {}
    for name, split in eval_splits(task, kind, validation).items():
        results[name] = evaluate_math(model, tokenizer, split, max_new_tokens=data.max_new_tokens,
                                      max_length=data.max_length, batch_size=data.eval_batch_size) \
            if data.generate else {"examples": len(split)}
        items = train_items(kind, task.family, tokenizer, split, data.max_length)
        results[name]["answer_token_loss"] = answer_token_loss(model, items, collate, data.eval_batch_size)
    return results


@torch.no_grad()
def answer_token_loss(model, items: list[dict], collate, batch_size: int) -> float:
    """Mean cross-entropy over answer tokens (the SFT loss) on held-out items."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
        labels = batch["labels"][:, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += (labels != -100).sum().item()
    return total / max(count, 1)
