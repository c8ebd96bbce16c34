"""A task's examples as model inputs: the splits a run uses (validation held out of train), tokenised training
items, and the collator for the model kind.

Causal LMs are trained by supervised fine-tuning with the loss on the answer tokens only (prompt tokens get
label -100); the prompt/answer formats are the ones the evaluators score (stablelora.eval.prompts).
"""

from __future__ import annotations

import torch

from stablelora.assets.models import CAUSAL, ENCODER
from stablelora.assets.tasks import CLASSIFICATION, GENERATION, TaskData, load_jsonl_task, load_task
from stablelora.eval.prompts import (generation_prompt, generation_target, mc_continuation, mc_prompt,
                                     tokenize_pair)
from stablelora.train.config import RunConfig
from stablelora.train.errors import RunError


def load_task_data(cfg: RunConfig) -> TaskData:
    data = cfg.data
    if data.dataset == "jsonl":
        task = load_jsonl_task(data.train_file, data.eval_file, data.format)
    else:
        task = load_task(data.dataset, eval_size=data.eval_size, seed=data.split_seed)
    if not data.generate and task.family != GENERATION:
        raise RunError(f"data.generate=false applies to generation (math) tasks only; task '{task.name}' is "
                       f"{task.family} and is scored without generating. Remove data.generate.")
    if data.validation_size:
        task.split_note += " " + _hold_out_validation(task, data.validation_size)
    if data.max_train_examples is not None:
        task.train = task.train[: data.max_train_examples]
    return task


def check_fits_task(cfg: RunConfig, task: TaskData, kind: str) -> None:
    """Refuse a model kind the task's training items and evaluation cannot serve."""
    if kind == ENCODER and task.family == GENERATION:
        raise RunError(f"Task '{task.name}' needs text generation; model '{cfg.model.name_or_path}' is an "
                       "encoder. Use a causal LM (e.g. model.name_or_path=smollm2-135m-instruct).")
    if kind == CAUSAL and task.family == CLASSIFICATION:
        raise RunError(f"Task '{task.name}' is classification, built for encoders here; use an encoder "
                       "(e.g. model.name_or_path=all-minilm-l6-v2).")


def _hold_out_validation(task: TaskData, size: int) -> str:
    """Carve the validation split out of train and say how.

    Examples that carry a "template" (GSM-Symbolic, or JSONL rows with one) are held out by whole templates, as the
    eval split is: validation problems from training templates would reward memorising those templates, and tuning
    on them picks ever larger learning rates while the held-out-template loss gets worse."""
    if not task.train or "template" not in task.train[0]:
        if size >= len(task.train):
            raise RunError(f"data.validation_size={size} leaves no training data ({len(task.train)} training "
                           "examples). Lower it.")
        task.validation, task.train = task.train[:size], task.train[size:]
        return f"Validation: the first {size} training examples, held out of training."
    templates = list(dict.fromkeys(x["template"] for x in task.train))  # first-seen order: the seeded shuffle
    if len(templates) < 2:
        raise RunError(f"data.validation_size={size}: the training examples come from {len(templates)} template, and "
                       "validation holds out whole templates, so none would be left to train on. Give the training "
                       "file examples from more templates, or drop the 'template' field to hold out single examples.")
    held = set(templates[: max(1, len(templates) // 8)])
    candidates = [x for x in task.train if x["template"] in held]
    if size > len(candidates):
        raise RunError(f"data.validation_size={size} needs more than the {len(candidates)} examples of the "
                       f"{len(held)} of {len(templates)} training templates held out for validation. Lower it to "
                       f"{len(candidates)} or less.")
    task.validation, task.train = candidates[:size], [x for x in task.train if x["template"] not in held]
    return (f"Validation: {size} examples from {len(held)} of the {len(templates)} training templates, held out of "
            "training whole, as the eval templates are.")


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def causal_sft_items(tokenizer, examples: list[dict], family: str, max_length: int) -> list[dict]:
    items = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        if family == "multiple_choice":
            prompt, target = mc_prompt(ex), mc_continuation(ex["choices"][ex["label"]])
        else:
            prompt, target = generation_prompt(ex), generation_target(ex)
        prompt_ids, target_ids = tokenize_pair(tokenizer, prompt, target, max_length - len(eos))
        target_ids = target_ids + eos
        items.append({"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids})
    return items


class CausalCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.tensor(it["input_ids"])
            labels[row, :n] = torch.tensor(it["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ClassificationCollator:
    """Tokenises (text, text_pair) on the fly: padding to the batch, truncating to max_length."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict:
        pairs = [it.get("text_pair") for it in items]
        enc = self.tokenizer([it["text"] for it in items], pairs if any(pairs) else None, truncation=True,
                             max_length=self.max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([it["label"] for it in items])
        return dict(enc)


class MultipleChoiceCollator:
    """(batch, choices, length) inputs for an encoder's multiple-choice head; one choice count per task."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict:
        counts = {len(it["choices"]) for it in items}
        if len(counts) != 1:
            raise ValueError("Encoder multiple-choice needs the same number of choices in every example; "
                             "train on one dataset at a time (not mcqa-mix).")
        (n,) = counts
        first = [mc_prompt(it) for it in items for _ in range(n)]
        second = [c for it in items for c in it["choices"]]
        enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        batch = {k: v.view(len(items), n, -1) for k, v in enc.items()}
        batch["labels"] = torch.tensor([it["label"] for it in items])
        return batch


def collator(kind: str, family: str, tokenizer, max_length: int):
    """Batches for the model kind: padded SFT items (causal LM), or tokenised on the fly (encoder heads)."""
    if kind == CAUSAL:
        return CausalCollator(tokenizer.pad_token_id)
    if family == CLASSIFICATION:
        return ClassificationCollator(tokenizer, max_length)
    return MultipleChoiceCollator(tokenizer, max_length)


def train_items(kind: str, family: str, tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    """What the Trainer's dataset holds: SFT items for a causal LM, the examples themselves for an encoder."""
    if kind == CAUSAL:
        return causal_sft_items(tokenizer, examples, family, max_length)
    return examples
