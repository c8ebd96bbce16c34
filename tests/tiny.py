"""Tiny PEFT models for unit tests: fast, deterministic, with LoRA layers of different shapes."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class TinyNet(nn.Module):
    """Embedding -> three Linear layers of different widths, so LoRA layers stop shrinking at different steps."""

    def __init__(self, vocab: int = 40, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, 48)
        self.mid = nn.Linear(48, 12)
        self.down = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).mean(dim=1)
        return self.head(torch.tanh(self.down(torch.tanh(self.mid(torch.tanh(self.up(h)))))))


def tiny_peft_model(seed: int = 0, *, embedding: bool = True, r: int = 4, **lora_kwargs) -> nn.Module:
    torch.manual_seed(seed)
    targets = ["up", "mid", "down"] + (["embed"] if embedding else [])
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **lora_kwargs)
    return get_peft_model(TinyNet(), config)


def batches(n: int, seed: int = 1, batch: int = 8, vocab: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, 5), generator=g), torch.randn(batch, 3, generator=g)) for _ in range(n)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    ids, target = batch
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(ids), target)
    loss.backward()
    optimizer.step()
    return loss.item()


def tiny_llama(seed: int = 0, vocab: int = 64):
    """A 2-layer random Llama: a real transformers causal LM, small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_llama_peft(seed: int = 0, vocab: int = 64, target_modules=("q_proj", "v_proj")):
    return get_peft_model(tiny_llama(seed, vocab), LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                                                              task_type="CAUSAL_LM"))


def token_items(n: int, vocab: int = 64, length: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return items


def swap_like_accelerate_fsdp2(opt: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module) -> None:
    """What Accelerate's ``_prepare_fsdp2`` does to an optimizer built before sharding: every parameter becomes a
    placeholder that remembers the old data_ptr, then ``fsdp2_switch_optimizer_parameters`` puts the new one in."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    new_by_name = dict(new_model.named_parameters())
    mapping = {p.data_ptr(): new_by_name[n] for n, p in old_model.named_parameters()}
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            placeholder = torch.empty(1, dtype=p.dtype)
            placeholder.data_ptr = p.data_ptr()
            group["params"][i] = placeholder
    fsdp2_switch_optimizer_parameters(opt, mapping)


def save_tiny_chat_model(directory, seed: int = 0) -> None:
    """A 2-layer random Llama with a word-level tokenizer and a ChatML chat template, saved as a local model
    directory: what a trainer framework loads from disk, built from nothing but transformers and tokenizers, so it
    works in any environment (no model hub, no asset package)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "system", "add", "and", "is", "what", "the", "sum", "of", "?", ".", "\n"]
    vocab = {token: i for i, token in enumerate(special + words + [str(n) for n in range(100)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), behavior="removed"),
                                                     pre_tokenizers.Split(Regex(r"\n|\?|\."), behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=special[2:])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)


def sum_conversations(n: int = 32) -> list[dict]:
    """Chat-format training data for the tiny chat model: 'what is the sum of a and b ?' -> 'a+b'."""
    return [{"messages": [{"role": "user", "content": f"what is the sum of {a} and {b} ?"},
                          {"role": "assistant", "content": str(a + b)}]}
            for a, b in ((i % 9, (3 * i) % 7) for i in range(n))]
