"""The base model and its LoRA adapter as the config asks: the model class a task needs, the targets checked before
any weight loads, QLoRA loading, the PEFT config, and the adapter saved as a standard PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from stablelora.assets.models import CAUSAL, ENCODER
from stablelora.assets.tasks import CLASSIFICATION, TaskData
from stablelora.fileio import atomic_directory
from stablelora.methods import lora_config_kwargs
from stablelora.optim.distributed import full_tensor, local_tensor
from stablelora.optim.zero import zero_stage
from stablelora.train.config import RunConfig
from stablelora.train.errors import RunError


def model_class(kind: str, family: str):
    from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification

    if kind == CAUSAL:
        return AutoModelForCausalLM
    return AutoModelForSequenceClassification if family == CLASSIFICATION else AutoModelForMultipleChoice


def lora_config(cfg: RunConfig, kind: str, family: str):
    from peft import LoraConfig, TaskType

    lora = cfg.lora
    targets = lora.target_modules or (["q_proj", "v_proj"] if kind == CAUSAL else ["query", "value"])
    if targets in ("all-linear", ["all-linear"]):
        targets = "all-linear"  # PEFT's own rule: every linear layer but the output head
    extra: dict[str, Any] = {}
    if kind == CAUSAL:
        extra["task_type"] = TaskType.CAUSAL_LM
    elif family == CLASSIFICATION:
        extra["task_type"] = TaskType.SEQ_CLS
    else:
        extra["modules_to_save"] = ["classifier"]
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      **extra, **lora_config_kwargs(cfg.method))


def check_targets(cfg: RunConfig, kind: str, family: str, model_dir: Path) -> None:
    """Refuse target modules the model does not have, from its architecture alone (no weights loaded)."""
    from transformers import AutoConfig

    targets = lora_config(cfg, kind, family).target_modules
    if isinstance(targets, str):  # "all-linear": PEFT finds the layers itself
        return
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = model_class(kind, family).from_config(config)
    names = [name for name, _ in skeleton.named_modules()]
    # PEFT's rule for a list of names: a module matches when its name is the target or ends in ".target"
    missing = sorted(t for t in targets
                     if not any(n == t or n.endswith(f".{t}") for n in names))
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise RunError(f"lora.target_modules: {missing} not found in {config.model_type} "
                       f"({cfg.model.name_or_path}). Its linear layers are: {linear}.")


def _from_pretrained(cls, model_dir: Path, **kwargs):
    """Load without transformers' LOAD REPORT table and progress bar, then say in one line what starts fresh."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    fresh = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    if fresh:
        print(f"New for this task, from random weights, trained with the adapter: {', '.join(fresh)} (the rest of "
              f"the model is pretrained).", flush=True)
    return model


def load_base_model(cfg: RunConfig, kind: str, task: TaskData, model_dir: Path):
    """The pretrained model in fp32, or 4-/8-bit prepared for QLoRA (model.quantization)."""
    extra = {"num_labels": task.num_labels or 2} if kind == ENCODER and task.family == CLASSIFICATION else {}
    cls = model_class(kind, task.family)
    quantization = cfg.model.quantization
    if quantization is None:
        return _from_pretrained(cls, model_dir, dtype=torch.float32, **extra)
    from bitsandbytes.nn import Linear4bit
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.training.bf16 else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute) if quantization == "4bit" else \
        BitsAndBytesConfig(load_in_8bit=True)
    model = _from_pretrained(cls, model_dir, dtype=torch.float32, quantization_config=bnb, **extra)
    for module in model.modules():
        # On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight for inference at the first no-grad
        # forward (our evaluation before training) and keeps that layout, whose kernel has no backward: every
        # later training step then gets no gradient through the base (B stayed 0). Keep the training layout.
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    # QLoRA's preparation: the base frozen, its remaining full-precision weights (norms, head) in fp32
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build_peft_model(cfg: RunConfig, kind: str, task: TaskData, model_dir: Path, train_items: list[dict],
                     collate: Callable[[list[dict]], dict]):
    """The base model with its LoRA adapter; LoRA-GA's init reads gradients of the first training batches."""
    from peft import get_peft_model

    base = load_base_model(cfg, kind, task, model_dir)
    config = lora_config(cfg, kind, task.family)
    if "lora-ga" in cfg.method.adapter:
        from peft.tuners.lora import preprocess_loraga

        batch_size = cfg.training.per_device_train_batch_size
        batches = [collate(train_items[i : i + batch_size]) for i in
                   range(0, batch_size * cfg.method.loraga_batches, batch_size)]

        def train_step():
            for batch in batches:
                base(**batch).loss.backward()

        preprocess_loraga(base, config, train_step)
    try:
        return get_peft_model(base, config)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise RunError(f"PEFT could not build the adapter for method.adapter={cfg.method.adapter}: {err}") from err


def gather_trainable(model) -> dict[str, torch.Tensor] | None:
    """The trainable weights as whole CPU tensors when FSDP2 shards them, or as ZeRO's fp32 masters (the model's
    own copies may be bf16) under DeepSpeed: a collective, so call it on every rank. None: nothing to gather."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params and zero_stage(params[0][1]) is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).cpu() for n, p in params}
    if all(local_tensor(p) is p for _, p in params):  # no DTensor: the model's own weights are whole
        return None
    return {n: full_tensor(p).cpu() for n, p in params}


def save_adapter(model, target: Path, init_dir: Path | None, state_dict: dict | None = None) -> None:
    """Save a standard PEFT adapter atomically; inits that mutate W0 are converted to plain LoRA (rank 2r).
    ``state_dict`` gives the weights when the model's own are shards (``gather_trainable``)."""
    with atomic_directory(target) as tmp:
        if init_dir is not None:
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(init_dir), state_dict=state_dict)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)


def save_initial_adapter(model, target: Path) -> None:
    """The adapter as initialised, saved before training for inits that rewrite W0 (PiSSA, OLoRA, LoRA-GA): saving
    the trained adapter converts it to plain LoRA against this one. Its config says init_lora_weights=True, so that
    loading it does not run the init again."""
    adapter_config = model.peft_config["default"]
    init_kind, adapter_config.init_lora_weights = adapter_config.init_lora_weights, True
    try:
        save_adapter(model, target, None)
    finally:
        adapter_config.init_lora_weights = init_kind
