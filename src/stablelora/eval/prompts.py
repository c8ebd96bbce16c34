"""The text formats shared by training and evaluation, so both see exactly the same tokens."""

from __future__ import annotations


def mc_prompt(example: dict) -> str:
    context = f"{example['context']}\n" if example.get("context") else ""
    return f"{context}Question: {example['question']}\nAnswer:"


def mc_continuation(choice: str) -> str:
    return f" {choice}"


def generation_prompt(example: dict) -> str:
    return f"Question: {example['prompt']}\nAnswer:"


def generation_target(example: dict) -> str:
    return f" {example['completion']}"


def tokenize_pair(tokenizer, prompt: str, continuation: str, max_length: int) -> tuple[list[int], list[int]]:
    """Prompt and continuation ids, tokenised separately (the boundary is exact), prompt cut from the left."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    cont_ids = cont_ids[: max_length - 1]
    keep = max(1, max_length - len(cont_ids))
    return prompt_ids[-keep:], cont_ids
