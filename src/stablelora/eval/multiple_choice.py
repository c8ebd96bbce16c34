"""Multiple-choice accuracy by log-likelihood of each option (causal LMs) or a multiple-choice head (encoders).

For causal LMs each option is scored by the log-probability of its tokens after the prompt. Two accuracies are
reported: ``accuracy`` uses the length-normalised score (mean log-probability per option token, so long options
are not penalised for their length) and is the headline number; ``accuracy_unnormalised`` uses the sum.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from stablelora.eval.classification import head_correct
from stablelora.eval.prompts import mc_continuation, mc_prompt, tokenize_pair


@torch.no_grad()
def option_logprobs(model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                    desc: str = "scoring options") -> list[tuple[float, int]]:
    """(sum of log-probs, number of tokens) of each continuation given its prompt."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, int] | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for row, i in enumerate(idx):
            p_len, c_len = len(pairs[i][0]), len(pairs[i][1])
            # logits at position t predict token t+1
            step_logits = logits[row, p_len - 1 : p_len + c_len - 1]
            targets = torch.tensor(pairs[i][1], device=step_logits.device)
            logp = torch.log_softmax(step_logits, dim=-1).gather(1, targets[:, None]).sum().item()
            out[i] = (logp, c_len)
    return out  # type: ignore[return-value]


def evaluate_causal_mc(model, tokenizer, examples: list[dict], *, max_length: int, batch_size: int = 16) -> dict:
    pairs, owners = [], []
    for n, ex in enumerate(examples):
        for choice in ex["choices"]:
            pairs.append(tokenize_pair(tokenizer, mc_prompt(ex), mc_continuation(choice), max_length))
            owners.append(n)
    scores = option_logprobs(model, tokenizer, pairs, batch_size, desc="multiple-choice eval")
    per_example: list[list[tuple[float, int]]] = [[] for _ in examples]
    for owner, score in zip(owners, scores):
        per_example[owner].append(score)
    norm_hits = sum(max(range(len(s)), key=lambda k: s[k][0] / s[k][1]) == ex["label"]
                    for s, ex in zip(per_example, examples))
    sum_hits = sum(max(range(len(s)), key=lambda k: s[k][0]) == ex["label"] for s, ex in zip(per_example, examples))
    chance = sum(1 / len(ex["choices"]) for ex in examples) / len(examples)
    return {"accuracy": norm_hits / len(examples), "accuracy_unnormalised": sum_hits / len(examples),
            "chance": chance, "examples": len(examples), "scoring": "length-normalised log-likelihood"}


def evaluate_encoder_mc(model, collate, examples: list[dict], batch_size: int = 32) -> dict:
    hits = head_correct(model, collate, examples, batch_size, "multiple-choice eval")
    chance = sum(1 / len(ex["choices"]) for ex in examples) / len(examples)
    return {"accuracy": hits / len(examples), "chance": chance, "examples": len(examples),
            "scoring": "multiple-choice head"}
