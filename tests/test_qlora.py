"""QLoRA: Stable-LoRA on a bitsandbytes 4-bit (and 8-bit) base, end to end on the CPU: pairing on PEFT's bnb LoRA
layers, the shrink and the stop, a checkpoint resumed bit-identically, and an adapter that loads onto the base."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stablelora.cli import main
from stablelora.train.config import ConfigError, load_config

pytestmark = pytest.mark.slow
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer, saved as a local model directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stablelora.assets.models import resolve_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _args(model_dir: Path, quantization: str) -> list[str]:
    return ["configs/smollm2_openbookqa.yaml", f"model.name_or_path={model_dir}", f"model.quantization={quantization}",
            "data.dataset=piqa", "data.eval_size=8", "data.max_train_examples=48", "data.max_length=64",
            "lora.r=4", "method.optimizer=stable-lora", "method.shrink_ratio=0.3", "training.max_steps=6",
            "training.save_steps=3", "training.per_device_train_batch_size=4", "training.learning_rate=1e-2",
            "training.warmup_steps=0", "training.lr_scheduler_type=constant", "training.disable_tqdm=true",
            "monitor.every=2"]


def test_stable_lora_on_a_4bit_base_trains_stops_resumes_and_exports(tiny_causal, tmp_path):
    from peft import PeftModel

    from stablelora.optim.pairs import find_lora_pairs
    from stablelora.train.data import load_task_data
    from stablelora.assets.models import CAUSAL
    from stablelora.train.model import load_base_model

    args = _args(tiny_causal, "4bit")
    assert main(["train", *args, "--output-dir", str(tmp_path / "straight")]) == 0
    assert main(["train", *args, "--output-dir", str(tmp_path / "cut"), "training.max_steps=3"]) == 0
    (tmp_path / "cut" / "metrics.json").unlink()  # continue the 3-step run to 6 from its checkpoint
    assert main(["train", *args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0

    first = json.loads((tmp_path / "straight" / "monitor.jsonl").read_text().splitlines()[0])
    # B learns from the first step, after the evaluation before training (a CPU inference repacking of the 4-bit
    # weights, kept into training, had cut the gradient through the base: B stayed 0 until a checkpoint save)
    assert first["step"] == 1 and all(layer["b_norm"] > 0 for layer in first["layers"])
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["stable_lora"]["layers"] == 4 and metrics["stable_lora"]["stopped"] >= 1  # 2 layers x q, v
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(t.dtype == torch.float32 for t in straight.values())  # LoRA weights stay fp32 on a 4-bit base

    # the base really was 4-bit, Stable-LoRA pairs PEFT's bnb LoRA layers, and the adapter loads onto that base
    cfg = load_config(args[0], args[1:], output_dir=str(tmp_path / "check"))
    base = load_base_model(cfg, CAUSAL, load_task_data(cfg), tiny_causal)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) == 2 * 7
    model = PeftModel.from_pretrained(base, tmp_path / "straight" / "adapter", is_trainable=True)
    pairs = find_lora_pairs(model)
    layers = [model.get_base_model().get_submodule(p.module_name) for p in pairs]
    assert len(pairs) == 4 and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_an_8bit_base_trains(tiny_causal, tmp_path):
    args = _args(tiny_causal, "8bit")
    assert main(["train", *args, "--output-dir", str(tmp_path / "run"), "training.max_steps=3"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["stable_lora"]["layers"] == 4


@pytest.mark.parametrize("change, message", [
    (["model.quantization=3bit"], "must be one of 4bit, 8bit"),
    (["method.adapter=[pissa]"], "rewrites the base weights"),
    (["training.fsdp=full_shard"], "sharding a bitsandbytes base is not supported"),
])
def test_combinations_a_quantized_base_cannot_take_are_refused(tiny_causal, tmp_path, change, message):
    args = _args(tiny_causal, "4bit")
    with pytest.raises(ConfigError, match=message):
        load_config(args[0], args[1:] + change, output_dir=str(tmp_path / "never"))


def test_a_quantized_base_without_bitsandbytes_says_how_to_install_it(tiny_causal, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    args = _args(tiny_causal, "4bit")
    with pytest.raises(ConfigError, match=r"model.quantization=4bit needs bitsandbytes: pip install 'stablelora\[qlora\]'"):
        load_config(args[0], args[1:], output_dir=str(tmp_path / "never"))
