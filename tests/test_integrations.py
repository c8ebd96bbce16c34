"""The trainer plug-ins, run for real: each test trains a tiny local chat model for a few steps through the
framework's own command line, with Stable-LoRA installed through the hook that framework calls, then through that
framework's own DeepSpeed ZeRO-2 option (one rank on the CPU), which must give the same adapter (ms-swift; on
these CPUs LLaMA-Factory v1's distributed mode synchronises a GPU), and with a DeepSpeed setting that would replace
Stable-LoRA, which must be refused with the reason (ms-swift, LLaMA-Factory; axolotl starts DeepSpeed with NCCL
when it reads its config, which needs a GPU).

The frameworks pin versions that conflict with the app's lock (ms-swift: transformers<5.20, peft<0.21), so they are
not in the default set-up: these tests skip there, and ``scripts/check_wheel.sh <framework>`` runs them in a venv of
the framework's own stack (with deepspeed) and the stablelora wheel installed beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stablelora.optim.stable import SHRINKING_KEY
from tiny import save_tiny_chat_model, sum_conversations

pytestmark = pytest.mark.integration

SHRINK_RATIO = 0.3
STEPS = 4


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_chat_model(directory)
    return directory


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in sum_conversations(32)))
    return path


def _lora_a_norms(adapter_dir: Path) -> dict[str, float]:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return {name: weights[name].norm().item() for name in weights if "lora_A" in name}


def _assert_stable_lora_shrank_a(stable: dict[str, float], plain: dict[str, float]) -> None:
    """Same seed, same data: Stable-LoRA's A must be at least one (1 - λ) shrink smaller than the base optimizer's,
    layer by layer (the optimizer updates themselves move ‖A‖ by well under 5 % in these few steps)."""
    assert stable.keys() == plain.keys() and len(stable) == 4  # q_proj and v_proj of 2 layers
    for name in stable:
        assert stable[name] < (1 - SHRINK_RATIO) * 1.05 * plain[name], name


def _assert_same_adapter(zero: dict[str, float], reference: dict[str, float]) -> None:
    """One rank of ZeRO-2 in fp32 trains what the plain run does (the shrink moves ‖A‖ by 76 % here)."""
    assert zero.keys() == reference.keys()
    for name in zero:
        assert zero[name] == pytest.approx(reference[name], rel=1e-4), name


# a ZeRO-2 config as the frameworks ship them, "auto" values filled in from the framework's own arguments
ZERO_2 = {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
          "train_micro_batch_size_per_gpu": "auto"}
ZERO_2_OFFLOAD = {**ZERO_2, "zero_optimization": {**ZERO_2["zero_optimization"],
                                                  "offload_optimizer": {"device": "cpu", "pin_memory": False}}}
ZERO_2_OPTIMIZER_BLOCK = {**ZERO_2, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
OFFLOAD_REFUSED = "offload_optimizer (device 'cpu') makes Accelerate replace the optimizer by DeepSpeedCPUAdam"
BLOCK_REFUSED = 'the DeepSpeed config has an "optimizer" block'


def _write_json(path: Path, value: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def _run(command: list[str], cwd: Path, deepspeed: bool = False, refused: str | None = None) -> None:
    """Run a framework's command; with ``refused``, it must fail before training with that message."""
    # offline, on the CPU, and no telemetry: axolotl's (on by default) hung for minutes at exit without a network
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "DO_NOT_TRACK": "1"}
    if deepspeed:  # one rank, as torchrun --nproc_per_node 1 would start it; DeepSpeed uses gloo on the CPU
        env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29617", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = f"{' '.join(command)}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    if refused is None:
        assert done.returncode == 0, output
    else:
        assert done.returncode != 0 and refused in done.stdout + done.stderr, output
        assert "'train_loss'" not in done.stdout + done.stderr, "refused only after training"


# ------------------------------------------------------------------------------------------------ ms-swift
def _swift_sft(chat_model: Path, chat_data: Path, output_dir: Path, optimizer: str, plugin: Path | None,
               deepspeed: str | None = None, refused: str | None = None) -> Path | None:
    command = [sys.executable, "-m", "swift.cli.sft", "--model", str(chat_model), "--model_type", "llama",
               "--template", "chatml", "--dataset", str(chat_data), "--tuner_type", "lora", "--lora_rank", "4",
               "--lora_alpha", "8", "--target_modules", "q_proj", "v_proj", "--max_steps", str(STEPS),
               "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
               "--warmup_ratio", "0", "--save_steps", str(STEPS), "--logging_steps", "1", "--seed", "0",
               "--torch_dtype", "float32", "--dataloader_num_workers", "0", "--dataset_num_proc", "1",
               "--split_dataset_ratio", "0", "--report_to", "none", "--output_dir", str(output_dir),
               "--optimizer", optimizer]
    if plugin is not None:
        command += ["--external_plugins", str(plugin)]
    if deepspeed is not None:  # swift's stock configs leave fp16 "auto", which this CPU cannot run
        command += ["--deepspeed", deepspeed, "--fp16", "false", "--bf16", "false"]
    output_dir.mkdir(parents=True, exist_ok=True)
    _run(command, cwd=output_dir.parent, deepspeed=deepspeed is not None, refused=refused)
    if refused is not None:
        return None
    (checkpoint,) = output_dir.glob(f"*/checkpoint-{STEPS}")
    return checkpoint


def test_ms_swift_external_plugin_trains_with_stable_lora(chat_model, chat_data, tmp_path):
    pytest.importorskip("swift", reason="ms-swift is not installed: scripts/check_wheel.sh ms-swift runs this")
    plugin = tmp_path / "stable_lora_plugin.py"
    plugin.write_text("from stablelora.integrations.swift import register\n"
                      f"register(shrink_ratio={SHRINK_RATIO})\n")
    stable = _swift_sft(chat_model, chat_data, tmp_path / "stable", "stable_lora", plugin)
    plain = _swift_sft(chat_model, chat_data, tmp_path / "plain", "default", None)
    _assert_stable_lora_shrank_a(_lora_a_norms(stable), _lora_a_norms(plain))
    saved = torch.load(stable / "optimizer.pt", weights_only=True)["state"].values()
    assert sum(SHRINKING_KEY in entry for entry in saved) == 4, "the checkpoint carries each layer's shrink state"

    # swift's own --deepspeed zero2 (its stock config): Stable-LoRA shrinks the fp32 masters, the same adapter
    zero = _swift_sft(chat_model, chat_data, tmp_path / "zero2", "stable_lora", plugin, deepspeed="zero2")
    _assert_same_adapter(_lora_a_norms(zero), _lora_a_norms(stable))
    # a config whose "optimizer" block would make DeepSpeed train its own AdamW: refused when the trainer is built
    block = _write_json(tmp_path / "zero2_optimizer_block.json", ZERO_2_OPTIMIZER_BLOCK)
    _swift_sft(chat_model, chat_data, tmp_path / "block", "stable_lora", plugin, deepspeed=str(block),
               refused=BLOCK_REFUSED)


# ------------------------------------------------------------------------------------------------ axolotl
def _axolotl_train(chat_model: Path, chat_data: Path, output_dir: Path, plugin: bool, optimizer: str = "adamw_torch",
                   refused: str | None = None) -> Path:
    import yaml

    config = {
        "base_model": str(chat_model), "model_type": "AutoModelForCausalLM", "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(chat_data), "ds_type": "json", "type": "chat_template"}],
        "chat_template": "tokenizer_default", "dataset_prepared_path": str(output_dir / "prepared"),
        "val_set_size": 0, "sequence_len": 64, "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"], "micro_batch_size": 4,
        "gradient_accumulation_steps": 1, "max_steps": STEPS, "num_epochs": 1, "optimizer": optimizer,
        "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "save_steps": STEPS, "logging_steps": 1, "seed": 0, "bf16": False, "fp16": False, "tf32": False,
        "output_dir": str(output_dir), "dataloader_num_workers": 0, "save_safetensors": True,
    }
    if plugin:
        config |= {"plugins": ["stablelora.integrations.axolotl.StableLoRAPlugin"],
                   "stable_lora_shrink_ratio": SHRINK_RATIO}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.yml"
    path.write_text(yaml.safe_dump(config))
    _run([sys.executable, "-m", "axolotl.cli.main", "train", str(path), "--launcher", "python"], cwd=output_dir,
         refused=refused)
    return output_dir / f"checkpoint-{STEPS}"


def _lora_b(adapter_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return {name: weights[name] for name in weights if "lora_B" in name}


def test_axolotl_plugin_trains_with_stable_lora(chat_model, chat_data, tmp_path):
    pytest.importorskip("axolotl", reason="axolotl is not installed: scripts/check_wheel.sh axolotl runs this")
    stable = _axolotl_train(chat_model, chat_data, tmp_path / "stable", plugin=True)
    plain = _axolotl_train(chat_model, chat_data, tmp_path / "plain", plugin=False)
    _assert_stable_lora_shrank_a(_lora_a_norms(stable), _lora_a_norms(plain))
    saved = torch.load(stable / "optimizer.pt", weights_only=True)["state"].values()
    assert sum(SHRINKING_KEY in entry for entry in saved) == 4, "the checkpoint carries each layer's shrink state"

    # one of axolotl's own optimizer classes (it sets optimizer_cls_and_kwargs itself): wrapped, not replaced
    adopt = _axolotl_train(chat_model, chat_data, tmp_path / "adopt", plugin=True, optimizer="adopt_adamw")
    plain_adopt = _axolotl_train(chat_model, chat_data, tmp_path / "plain_adopt", plugin=False,
                                 optimizer="adopt_adamw")
    _assert_stable_lora_shrank_a(_lora_a_norms(adopt), _lora_a_norms(plain_adopt))
    b_adopt, b_adamw = _lora_b(adopt), _lora_b(stable)
    assert all(not torch.allclose(b_adopt[n], b_adamw[n], rtol=1e-3) for n in b_adopt), "ADOPT became AdamW"
    # axolotl's factory-built optimizers cannot be wrapped: refused, not replaced
    _axolotl_train(chat_model, chat_data, tmp_path / "muon", plugin=True, optimizer="muon",
                   refused="StableLoRAPlugin cannot wrap optimizer: muon")

    # axolotl's deepspeed: cannot be started on these CPUs: axolotl's setup_deepspeed_env initialises the process
    # group with NCCL when it reads the config, before any plug-in runs (a GPU check; the plug-in refuses the
    # settings of check_zero_config in post_trainer_create, through guard_stable_lora).


# ------------------------------------------------------------------------------------------------ LLaMA-Factory
def _llamafactory_sft(chat_model: Path, chat_data: Path, output_dir: Path, plugin: bool,
                      deepspeed: dict | None = None, refused: str | None = None) -> Path:
    import yaml

    output_dir.mkdir(parents=True)
    alpaca = output_dir / "sums_alpaca.jsonl"
    alpaca.write_text("".join(
        json.dumps({"instruction": item["messages"][0]["content"], "input": "",
                    "output": item["messages"][1]["content"]}) + "\n"
        for item in map(json.loads, chat_data.read_text().splitlines())))
    datasets = output_dir / "datasets.yaml"
    datasets.write_text(yaml.safe_dump({"sums": {"path": str(alpaca), "source": "local", "converter": "alpaca"}}))
    config = {
        "model": str(chat_model), "template": "chatml", "train_dataset": str(datasets),
        "peft_config": {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                        "target_modules": ["q_proj", "v_proj"]},
        "output_dir": str(output_dir / "out"), "micro_batch_size": 4, "global_batch_size": 4, "cutoff_len": 64,
        "learning_rate": 1e-3, "max_steps": STEPS, "seed": 0, "logging_steps": 1,
    }
    if plugin:
        config["optim_config"] = {"name": "stable_lora", "lr": 1e-3, "shrink_ratio": SHRINK_RATIO}
    else:  # the plain run: v1's own default, torch AdamW at learning_rate, the base the plug-in wraps
        config["optim_config"] = None
    if deepspeed is not None:
        config["dist_config"] = {"name": "deepspeed",
                                 "config_file": str(_write_json(output_dir / "deepspeed.json", deepspeed))}
    path = output_dir / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    _run([sys.executable, "-m", "stablelora.integrations.llamafactory", "sft", str(path)], cwd=output_dir,
         deepspeed=deepspeed is not None, refused=refused)
    return output_dir / "out"


def test_llamafactory_v1_optimizer_plugin_trains_with_stable_lora(chat_model, chat_data, tmp_path):
    pytest.importorskip("llamafactory", reason="LLaMA-Factory is not installed: "
                        "scripts/check_wheel.sh llamafactory runs this")
    stable = _llamafactory_sft(chat_model, chat_data, tmp_path / "stable", plugin=True)
    plain = _llamafactory_sft(chat_model, chat_data, tmp_path / "plain", plugin=False)
    _assert_stable_lora_shrank_a(_lora_a_norms(stable), _lora_a_norms(plain))

    # v1's dist_config with name: deepspeed and offload_optimizer: refused with the fix when the optimizer is built.
    # (A ZeRO-2 training run cannot be checked here: v1's distributed mode calls torch.accelerator.synchronize()
    # at its first step, which needs a GPU, even for one rank.)
    _llamafactory_sft(chat_model, chat_data, tmp_path / "offload", plugin=True, deepspeed=ZERO_2_OFFLOAD,
                      refused=OFFLOAD_REFUSED)
