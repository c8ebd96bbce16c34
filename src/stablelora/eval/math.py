"""Math word problems: greedy generation, then exact match of the final number."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from stablelora.eval.prompts import generation_prompt

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def extract_final_number(text: str) -> str | None:
    """The answer a solution commits to: the number after '####' if present, else the last number in the text."""
    match = _FINAL.search(text)
    raw = match.group(1) if match else (_NUMBER.findall(text) or [None])[-1]
    if raw is None:
        return None
    raw = raw.replace(",", "").rstrip(".")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def same_number(predicted: str | None, expected: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(expected)) < 1e-6
    except ValueError:
        return False


@torch.no_grad()
def evaluate_math(model, tokenizer, examples: list[dict], *, max_new_tokens: int, max_length: int,
                  batch_size: int = 8) -> dict:
    model.eval()
    device = next(model.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    hits, samples = 0, []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="math eval (greedy)", unit="batch", leave=False):
            chunk = examples[start : start + batch_size]
            enc = tokenizer([generation_prompt(ex) for ex in chunk], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length, add_special_tokens=False)
            out = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for ex, text in zip(chunk, texts):
                predicted = extract_final_number(text.split("\nQuestion:")[0])
                hits += same_number(predicted, ex["answer"])
                if len(samples) < 3:
                    samples.append({"question": ex["prompt"][:200], "generated": text[:400], "predicted": predicted,
                                    "expected": ex["answer"]})
    finally:
        tokenizer.padding_side = previous_side
    return {"exact_match": hits / len(examples), "examples": len(examples), "samples": samples}
