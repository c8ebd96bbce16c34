"""Turn task examples into model inputs: tokenised datasets for training and collators for batches.

Causal LMs are trained by supervised fine-tuning with the loss on the answer tokens only (prompt tokens get
label -100); the prompt/answer formats are the ones the evaluators score (stablelora.eval.prompts).
"""

from __future__ import annotations

import torch

from stablelora.eval.prompts import (generation_prompt, generation_target, mc_continuation, mc_prompt,
                                     tokenize_pair)


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
