"""One training run, from a RunConfig to a run directory (the contract every later stage reads).

RUN/config.yaml          resolved config, with versions
RUN/eval_before.json     evaluation of the untrained adapter (B = 0: the base model)
RUN/metrics.json         eval before/after, train loss, wall time, tokens/s, Stable-LoRA stop summary
RUN/stable_lora_status.json   per-layer shrink status (Stable-LoRA runs)
RUN/monitor.jsonl        per-step, per-layer stability diagnostics (StabilityMonitor)
RUN/log_history.json     Trainer's log (training loss, learning rate, ...) for reports
RUN/adapter/             adapter_model.safetensors + adapter_config.json (PeftModel.from_pretrained)
RUN/checkpoints/         Trainer checkpoints (optimizer state includes the Stable-LoRA flags)
RUN/tb/                  TensorBoard events
Every file is written to a temporary name and renamed, so a killed run never leaves one that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from stablelora.assets.models import resolve_model
from stablelora.diagnostics.monitor import StabilityMonitor, module_type
from stablelora.assets.tasks import CLASSIFICATION, GENERATION, MULTIPLE_CHOICE, TaskData, load_jsonl_task, load_task
from stablelora.eval.classification import evaluate_classification
from stablelora.fileio import atomic_directory, write_atomic, write_json
from stablelora.eval.math import evaluate_math
from stablelora.eval.multiple_choice import evaluate_causal_mc, evaluate_encoder_mc
from stablelora.methods import ADAPTER_OPTIONS, lora_config_kwargs
from stablelora.optim.distributed import full_tensor, local_tensor
from stablelora.train.config import RunConfig
from stablelora.train.data import (CausalCollator, ClassificationCollator, ListDataset, MultipleChoiceCollator,
                                   causal_sft_items)
from stablelora.train.trainer import (DivergenceGuard, GracefulInterrupt, StableLoRATrainer, TrainingDiverged,
                                     unwrap_optimizer)

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta", "deberta-v2", "electra",
                 "albert"}
CAUSAL, ENCODER = "causal-lm", "encoder"


class RunError(RuntimeError):
    """A run that cannot start or go on as configured; the message says how to fix it."""


class RunDiverged(RunError):
    """The run's weights stopped being finite; RUN/diverged.json says when and what, for compare."""


def check_checkpoint(checkpoint: Path) -> None:
    """Read every file of a checkpoint before resuming from it, so a damaged one is named with the way out."""
    from safetensors.torch import load_file

    readers = {".json": lambda f: json.loads(f.read_text(encoding="utf-8")), ".safetensors": load_file,
               ".pt": lambda f: torch.load(f, map_location="cpu", weights_only=False),
               ".pth": lambda f: torch.load(f, map_location="cpu", weights_only=False)}
    for file in sorted(checkpoint.iterdir()):
        if file.is_file() and file.suffix in readers:
            try:
                readers[file.suffix](file)
            except Exception as err:  # noqa: BLE001 - any failure to read means the same: this file is damaged
                earlier = [p for p in finished_checkpoints(checkpoint.parent) if _step_of(p) < _step_of(checkpoint)]
                way_out = (f"Delete {checkpoint} and --resume again to continue from {earlier[-1].name}"
                           if earlier else "Start the run again without --resume (there is no earlier checkpoint)")
                raise RunError(f"--resume: checkpoint {checkpoint.name} is damaged: {file.name} cannot be read "
                               f"({type(err).__name__}: {str(err)[:200]}). {way_out}.") from err


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def finished_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints Trainer finished writing (trainer_state.json is written last), oldest first."""
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return sorted(done, key=_step_of)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    done = finished_checkpoints(checkpoint_dir)
    return done[-1] if done else None


def model_kind(model_dir: Path) -> str:
    from transformers import AutoConfig

    return ENCODER if AutoConfig.from_pretrained(model_dir).model_type in ENCODER_TYPES else CAUSAL


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


class TaskPipeline:
    """Model class, PEFT settings, training items and evaluation for one (task family, model kind)."""

    def __init__(self, cfg: RunConfig, task: TaskData, kind: str, tokenizer):
        self.cfg, self.task, self.kind, self.tokenizer = cfg, task, kind, tokenizer
        family = task.family
        if kind == ENCODER and family == GENERATION:
            raise RunError(f"Task '{task.name}' needs text generation; model '{cfg.model.name_or_path}' is an "
                           "encoder. Use a causal LM (e.g. model.name_or_path=smollm2-135m-instruct).")
        if kind == CAUSAL and family == CLASSIFICATION:
            raise RunError(f"Task '{task.name}' is classification, built for encoders here; use an encoder "
                           "(e.g. model.name_or_path=all-minilm-l6-v2).")

    def check_targets(self, model_dir: Path) -> None:
        """Refuse target modules the model does not have, from its architecture alone (no weights loaded)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = self.model_class().from_config(config)
        names = [name for name, _ in skeleton.named_modules()]
        # PEFT's rule for a list of names: a module matches when its name is the target or ends in ".target"
        missing = sorted(t for t in self.lora_config().target_modules
                         if not any(n == t or n.endswith(f".{t}") for n in names))
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise RunError(f"lora.target_modules: {missing} not found in {config.model_type} "
                           f"({self.cfg.model.name_or_path}). Its linear layers are: {linear}.")

    def model_class(self):
        from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification

        if self.kind == CAUSAL:
            return AutoModelForCausalLM
        return AutoModelForSequenceClassification if self.task.family == CLASSIFICATION else AutoModelForMultipleChoice

    def load_model(self, model_dir: Path):
        extra = {"num_labels": self.task.num_labels or 2} if self.kind == ENCODER and \
            self.task.family == CLASSIFICATION else {}
        quantization = self.cfg.model.quantization
        if quantization is None:
            return self.model_class().from_pretrained(model_dir, dtype=torch.float32, **extra)
        from bitsandbytes.nn import Linear4bit
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if self.cfg.training.bf16 else torch.float32
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute) if quantization == "4bit" else \
            BitsAndBytesConfig(load_in_8bit=True)
        model = self.model_class().from_pretrained(model_dir, dtype=torch.float32, quantization_config=bnb, **extra)
        for module in model.modules():
            # On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight for inference at the first no-grad
            # forward (our evaluation before training) and keeps that layout, whose kernel has no backward: every
            # later training step then gets no gradient through the base (B stayed 0). Keep the training layout.
            if isinstance(module, Linear4bit):
                module.support_avx512bf16_for_cpu = False
        # QLoRA's preparation: the base frozen, its remaining full-precision weights (norms, head) in fp32
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    def lora_config(self):
        from peft import LoraConfig, TaskType

        lora = self.cfg.lora
        targets = lora.target_modules or (["q_proj", "v_proj"] if self.kind == CAUSAL else ["query", "value"])
        extra: dict[str, Any] = {}
        if self.kind == CAUSAL:
            extra["task_type"] = TaskType.CAUSAL_LM
        elif self.task.family == CLASSIFICATION:
            extra["task_type"] = TaskType.SEQ_CLS
        else:
            extra["modules_to_save"] = ["classifier"]
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          **extra, **lora_config_kwargs(self.cfg.method))

    def collator(self):
        max_length = self.cfg.data.max_length
        if self.kind == CAUSAL:
            return CausalCollator(self.tokenizer.pad_token_id)
        if self.task.family == CLASSIFICATION:
            return ClassificationCollator(self.tokenizer, max_length)
        return MultipleChoiceCollator(self.tokenizer, max_length)

    def train_items(self, examples: list[dict]) -> list[dict]:
        if self.kind == CAUSAL:
            return causal_sft_items(self.tokenizer, examples, self.task.family, self.cfg.data.max_length)
        return examples

    def evaluate(self, model, validation: bool = False) -> dict:
        """Scores on the eval split (and extra evals), or on the validation split carved from train."""
        data, task = self.cfg.data, self.task
        examples = task.validation if validation else task.eval
        if self.kind == ENCODER:
            fn = evaluate_classification if task.family == CLASSIFICATION else evaluate_encoder_mc
            return {task.name: fn(model, self.collator(), examples, batch_size=data.eval_batch_size)}
        if task.family == MULTIPLE_CHOICE:
            return {task.name: evaluate_causal_mc(model, self.tokenizer, examples, max_length=data.max_length,
                                                  batch_size=data.eval_batch_size)}
        results = {}
        splits = {task.name: examples} if validation else {task.name: task.eval, **task.extra_eval}
        for name, split in splits.items():
            results[name] = evaluate_math(model, self.tokenizer, split, max_new_tokens=data.max_new_tokens,
                                          max_length=data.max_length, batch_size=data.eval_batch_size) \
                if data.generate else {"examples": len(split)}
            results[name]["answer_token_loss"] = answer_token_loss(model, self.train_items(split),
                                                                   self.collator(), data.eval_batch_size)
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


def build_peft_model(pipeline: TaskPipeline, model_dir: Path, train_items: list[dict]):
    from peft import get_peft_model

    base = pipeline.load_model(model_dir)
    config = pipeline.lora_config()
    if "lora-ga" in pipeline.cfg.method.adapter:
        from peft.tuners.lora import preprocess_loraga

        collate = pipeline.collator()
        batch_size = pipeline.cfg.training.per_device_train_batch_size
        batches = [collate(train_items[i : i + batch_size]) for i in
                   range(0, batch_size * pipeline.cfg.method.loraga_batches, batch_size)]

        def train_step():
            for batch in batches:
                base(**batch).loss.backward()

        preprocess_loraga(base, config, train_step)
    try:
        return get_peft_model(base, config)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise RunError(f"PEFT could not build the adapter for method.adapter={pipeline.cfg.method.adapter}: {err}") \
            from err


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


def gather_trainable(model) -> dict[str, torch.Tensor] | None:
    """The trainable weights as whole CPU tensors when FSDP2 shards them (a collective: call it on every rank),
    else None (nothing to gather)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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


def stop_summary(optimizer) -> dict | None:
    status = getattr(optimizer, "stable_lora_status", None)
    if status is None:
        return None
    layers = status()
    stops = [s.stop_step for s in layers if s.stop_step is not None]
    return {
        "layers": len(layers),
        "stopped": len(stops),
        "median_stop_step": statistics.median(stops) if stops else None,
        "first_stop_step": min(stops) if stops else None,
        "last_stop_step": max(stops) if stops else None,
        "per_layer": [{"name": s.name, "type": module_type(s.module), "in": s.in_features, "out": s.out_features,
                       "stop_step": s.stop_step} for s in layers],
    }


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of tensors in the optimizer's state (moments, preconditioners, Stable-LoRA flags), this process."""
    total = 0
    for entry in optimizer.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))
    return total


def peak_memory() -> dict:
    """Peak accelerator memory torch allocated since the last reset, or on CPU the process's peak resident set size
    (which includes loading the model and the evaluation before training)."""
    if torch.cuda.is_available():
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "cuda max allocated"}
    import resource

    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process max RSS"}


def versions() -> dict:
    import peft
    import transformers

    import stablelora

    return {"stablelora": stablelora.__version__, "torch": str(torch.__version__), "transformers": transformers.__version__,
            "peft": peft.__version__}


# What a resumed run may change: how long it trains and how it logs and saves. Anything else (learning rate, method,
# data, model, seed, ...) is restored from the checkpoint by Trainer and the optimizer, so a change would be ignored
# while config.yaml claimed it.
RESUMABLE_KEYS = {"training.max_steps", "training.num_train_epochs", "training.save_steps", "training.save_total_limit",
                  "training.logging_steps", "training.disable_tqdm", "training.report_to", "training.output_dir"}
# What a run writes into its directory (besides checkpoints/): cleared when a new run starts where one failed to.
RUN_FILES = ("config.yaml", "eval_before.json", "metrics.json", "diverged.json", "monitor.jsonl",
             "log_history.json", "stable_lora_status.json", "adapter", "adapter_init", "tb")


def check_resumable(cfg: RunConfig) -> None:
    """Refuse a resume of a finished run, or with settings that differ from the run's own config.yaml."""
    run_dir = cfg.run_dir
    if (run_dir / "metrics.json").exists():
        raise RunError(f"--resume: the run in {run_dir} has finished (metrics.json is written); there is nothing to "
                       "continue. Its results stay as they are; start a new run in another output directory.")
    if (run_dir / "diverged.json").exists():
        step = json.loads((run_dir / "diverged.json").read_text(encoding="utf-8"))["step"]
        raise RunError(f"--resume: the run in {run_dir} diverged by step {step} (diverged.json); with the same "
                       "settings it would diverge again, and they cannot change on a resume. Start a new run with a "
                       "lower training.learning_rate in another output directory.")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    changed = []
    for section in sorted((set(saved) | set(cfg.raw)) - {"versions"}):
        old, new = saved.get(section) or {}, cfg.raw.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if f"{section}.{key}" not in RESUMABLE_KEYS and old.get(key) != new.get(key):
                changed.append(f"{section}.{key}: {old.get(key)!r} in the run, {new.get(key)!r} now")
    if changed:
        raise RunError(f"--resume with settings that differ from the run's own ({saved_path}): " + "; ".join(changed)
                       + ". The checkpoint would restore the old values while config.yaml recorded the new ones. "
                       "Resume with the same config and overrides, or start a new run in another output directory.")


def remove_failed_start(run_dir: Path) -> None:
    """A new run where an earlier one failed before its first checkpoint: its files must not mix with this run's."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def reached_last_step(checkpoint: Path, max_steps: int) -> bool:
    """Whether the checkpoint is the run's last step (a run killed during its final evaluation or save)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    last = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return last > 0 and state.get("global_step", 0) >= last


def restore_finished_training(trainer, checkpoint: Path) -> None:
    """Load what the last checkpoint holds (adapter, optimizer with its Stable-LoRA state, Trainer state) without
    training: Trainer's own resume from the last step would train one step more."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights, optimizer = checkpoint / "adapter_model.safetensors", checkpoint / "optimizer.pt"
    if not weights.exists() or not optimizer.exists():
        raise RunError(f"--resume: {checkpoint} is the run's last step but holds no {weights.name} and "
                       f"{optimizer.name} to finish from (a sharded FSDP checkpoint?). Its adapter is in the checkpoint; "
                       "evaluate it with PeftModel.from_pretrained, or start the run again.")
    set_peft_model_state_dict(trainer.model, load_file(weights))
    trainer.create_optimizer()
    trainer.optimizer.load_state_dict(torch.load(optimizer, map_location="cpu", weights_only=True))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def train_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over the logged steps of a resumed run (Trainer's own figure covers only the steps after the
    resume). Each logged loss is the mean since the previous log, so it is weighted by its span."""
    total, covered, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            span = entry["step"] - previous
            total, covered, previous = total + entry["loss"] * span, covered + span, entry["step"]
    return total / covered if covered else None


@dataclass
class LoadedRun:
    """What the steps of a run share once the model and data are loaded."""

    task: TaskData
    pipeline: TaskPipeline
    train_items: list[dict]
    model: Any
    init_dir: Path | None  # the adapter before training, for inits that rewrite W0 (saving converts against it)


def open_run_directory(cfg: RunConfig, resume: bool, main_process: bool) -> Path | None:
    """Refuse a clash with an earlier run, check what a resume needs, write config.yaml; returns the checkpoint to
    resume from."""
    run_dir = cfg.run_dir
    checkpoints = Path(cfg.training.output_dir)
    if not resume and (checkpoints.exists() and any(checkpoints.iterdir()) or (run_dir / "metrics.json").exists()):
        raise RunError(f"Run directory {run_dir} already holds a run. Continue it with --resume, or choose another "
                       "output directory (--output-dir / training.output_dir).")
    resume_from = latest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        raise RunError(f"--resume: no finished checkpoint in {checkpoints}. Start the run without --resume.")
    if resume:
        check_resumable(cfg)
        check_checkpoint(resume_from)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if main_process:
            if not resume:
                remove_failed_start(run_dir)
            write_atomic(run_dir / "config.yaml", yaml.safe_dump({**cfg.raw, "versions": versions()}, sort_keys=False))
    except OSError as err:
        raise RunError(f"Cannot write the run directory {run_dir}: {err.strerror or err}. Choose a directory you can "
                       "write to (--output-dir / training.output_dir).") from err
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tb")
    return resume_from


def load_run(cfg: RunConfig, main_process: bool) -> LoadedRun:
    """Seed, then the tokenizer, the task's splits and the base model with its adapter."""
    from transformers import AutoTokenizer, set_seed

    set_seed(cfg.training.seed)
    model_dir = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = load_task_data(cfg)
    pipeline = TaskPipeline(cfg, task, model_kind(model_dir), tokenizer)
    pipeline.check_targets(model_dir)
    train_items = pipeline.train_items(task.train)
    model = build_peft_model(pipeline, model_dir, train_items)
    init_dir = None
    if any(ADAPTER_OPTIONS[o].mutates_base for o in cfg.method.adapter):
        init_dir = cfg.run_dir / "adapter_init"
        if main_process and not init_dir.exists():
            save_initial_adapter(model, init_dir)
    return LoadedRun(task, pipeline, train_items, model, init_dir)


def evaluate_before(cfg: RunConfig, run: LoadedRun, given: dict | None, resume: bool, main_process: bool) -> dict:
    """The evaluation of the untrained adapter: given (compare shares one), kept from the interrupted run, or made."""
    path = cfg.run_dir / "eval_before.json"
    result = given
    if result is None and resume and path.exists():
        result = json.loads(path.read_text())
    if result is None:
        run.model.to(cfg.training.device)  # where Trainer will train it: a GPU evaluates in seconds, not minutes
        result = run.pipeline.evaluate(run.model)
    if main_process:
        write_json(path, result)
    return result


def make_trainer(cfg: RunConfig, run: LoadedRun, main_process: bool) -> tuple[StableLoRATrainer, GracefulInterrupt]:
    interrupt = GracefulInterrupt()
    callbacks = [interrupt, DivergenceGuard(run.model)]
    if cfg.monitor.enabled:
        probe = run.pipeline.collator()(run.pipeline.train_items(run.task.train[: cfg.monitor.probe_examples]))
        callbacks.append(StabilityMonitor(run.model, probe, every=cfg.monitor.every,
                                          output_dir=cfg.run_dir if main_process else None, tensorboard=True))
    trainer = StableLoRATrainer(model=run.model, args=cfg.training, train_dataset=ListDataset(run.train_items),
                                data_collator=run.pipeline.collator(), method=cfg.method, callbacks=callbacks)
    return trainer, interrupt


def train(cfg: RunConfig, run: LoadedRun, trainer: StableLoRATrainer, resume_from: Path | None,
          main_process: bool) -> tuple[float | None, float, dict]:
    """Train (or restore a run killed after its last checkpoint); returns the train loss, wall seconds and the
    memory peak. A diverged run leaves diverged.json and its log, and nothing that looks like a result."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak of training, not of loading or the first evaluation
    started = time.perf_counter()
    if resume_from is not None and reached_last_step(resume_from, cfg.training.max_steps):
        restore_finished_training(trainer, resume_from)  # killed after its last checkpoint: do not train again
        loss = train_loss(trainer.state.log_history)
    else:
        try:
            loss = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).training_loss
        except TrainingDiverged as err:
            if main_process:
                write_json(cfg.run_dir / "diverged.json", {"step": err.step, "message": str(err),
                                                           "split": run.task.split_note,
                                                           "model": cfg.model.name_or_path})
                write_json(cfg.run_dir / "log_history.json", trainer.state.log_history)
            raise RunDiverged(str(err)) from err
        if resume_from is not None:  # Trainer's figure covers only the steps after the resume
            loss = train_loss(trainer.state.log_history)
    return loss, time.perf_counter() - started, peak_memory()


def save_outputs(cfg: RunConfig, run: LoadedRun, trainer: StableLoRATrainer, main_process: bool) -> dict | None:
    """The log, the adapter and the Stable-LoRA stop summary (returned), saved before the evaluation after training
    so that a failed evaluation loses no training."""
    summary = stop_summary(unwrap_optimizer(trainer.optimizer))
    gathered = gather_trainable(run.model)  # FSDP2: every rank takes part
    if main_process:
        write_json(cfg.run_dir / "log_history.json", trainer.state.log_history)
        save_adapter(run.model, cfg.run_dir / "adapter", run.init_dir, gathered)
        if summary is not None:
            write_json(cfg.run_dir / "stable_lora_status.json", summary)
    return summary


def run_training(cfg: RunConfig, *, resume: bool = False, eval_before: dict | None = None) -> dict:
    """Train and evaluate one configuration; returns the metrics written to RUN/metrics.json.

    Under torchrun / accelerate launch every rank runs this function; only the main process writes files.
    """
    main_process = int(os.environ.get("RANK", "0")) == 0
    resume_from = open_run_directory(cfg, resume, main_process)
    run = load_run(cfg, main_process)
    eval_before = evaluate_before(cfg, run, eval_before, resume, main_process)
    trainer, interrupt = make_trainer(cfg, run, main_process)
    loss, wall, memory = train(cfg, run, trainer, resume_from, main_process)
    if interrupt.requested:
        raise KeyboardInterrupt(f"Interrupted: checkpoint saved under {cfg.training.output_dir}; continue with "
                                "--resume.")
    summary = save_outputs(cfg, run, trainer, main_process)
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "task": run.task.name,
        "split": run.task.split_note,
        "model": cfg.model.name_or_path,
        "method": {"optimizer": cfg.method.optimizer, "adapter": cfg.method.adapter},
        "seed": cfg.training.seed,
        "eval_before": eval_before,
        "eval_after": run.pipeline.evaluate(run.model),
        "eval_validation": run.pipeline.evaluate(run.model, validation=True) if run.task.validation else None,
        "train_loss": loss,
        "train_steps": trainer.state.global_step,
        "train_wall_seconds": wall,
        "train_tokens": tokens,
        "tokens_per_second": tokens / wall if tokens else None,
        "optimizer_state_bytes": optimizer_state_bytes(unwrap_optimizer(trainer.optimizer)),
        **memory,
        "resumed_from": str(resume_from) if resume_from else None,
        "stable_lora": {k: v for k, v in summary.items() if k != "per_layer"} if summary else None,
    }
    if main_process:
        write_json(cfg.run_dir / "metrics.json", metrics)
    return metrics
