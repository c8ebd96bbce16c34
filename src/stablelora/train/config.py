"""Run configuration: HF-style dataclass arguments loaded from YAML with ``section.key=value`` overrides.

Sections: ``model``, ``data``, ``lora``, ``method`` (stablelora.methods.MethodArguments), ``monitor`` and ``training``
(``transformers.TrainingArguments``). Unknown sections or keys, and values of the wrong type, raise one
``ConfigError`` that names the key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import io
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stablelora.methods import MethodArguments


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans and numbers: only true/false are booleans, so `save_strategy: no` stays the string
    'no'; every way a person writes a float is a float (PyYAML's YAML 1.1 reads `2e-4` and `1E3` as strings).
    A key given twice in one mapping is an error: PyYAML keeps the last silently (a second `training:` section
    would drop the first whole)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key_node.value!r} is given twice (first on line "
                    f"{first_line[key_node.value]}); the second would silently replace the first. Keep one.",
                    key_node.start_mark)
            first_line[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),  # exponents without a dot
    list("-+0123456789."))


def load_yaml(text: str, name: str = "<override>"):
    """YAML 1.2 numbers (2e-4 is a float), for run and compare configs alike; errors name ``name`` and the line."""
    stream = io.StringIO(text)
    stream.name = name
    return yaml.load(stream, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ModelArguments:
    name_or_path: str = field(default="smollm2-135m-instruct",
                              metadata={"help": "a named offline model (stablelora models) or a local HF model dir"})
    quantization: str | None = field(default=None, metadata={
        "help": "4bit (NF4, QLoRA) or 8bit: load the frozen base through bitsandbytes; LoRA weights stay fp32"})


@dataclass
class DataArguments:
    dataset: str = field(default="openbookqa", metadata={"help": "a named task (stablelora tasks) or 'jsonl'"})
    train_file: str | None = None
    eval_file: str | None = None
    format: str | None = field(default=None, metadata={"help": "jsonl: multiple_choice|classification|generation"})
    eval_size: int = 200
    validation_size: int = field(default=0, metadata={
        "help": "examples held out of train to choose hyper-parameters on (never the eval split); 0 = none"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/eval split, fixed across training seeds"})
    max_train_examples: int | None = None
    max_length: int = 256
    max_new_tokens: int = 192
    generate: bool = field(default=True, metadata={
        "help": "math tasks: greedy generation scored by exact match; false scores the answer-token loss only "
                "(generation is most of a CPU run's evaluation time)"})
    eval_batch_size: int = 16


@dataclass
class LoraArguments:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "default: q_proj,v_proj (causal LM, as the paper) / query,value (encoder)"})


@dataclass
class MonitorArguments:
    enabled: bool = field(default=True, metadata={"help": "record per-layer stability diagnostics (monitor.jsonl)"})
    every: int = field(default=10, metadata={"help": "optimizer steps between records"})
    probe_examples: int = field(default=8, metadata={"help": "training examples in the fixed probe batch"})


# The sections that need no heavy import: built and checked before transformers (and torch) is imported, so a
# typo in them is refused in about a second.
LIGHT_SECTIONS: dict[str, type] = {"model": ModelArguments, "data": DataArguments, "lora": LoraArguments,
                                   "method": MethodArguments, "monitor": MonitorArguments}
SECTION_NAMES = (*LIGHT_SECTIONS, "training")


def _sections() -> dict[str, type]:
    from transformers import TrainingArguments

    return {**LIGHT_SECTIONS, "training": TrainingArguments}


@functools.cache
def _training_argument_names() -> frozenset[str] | None:
    """The field names of transformers.TrainingArguments, read from its source without importing it (the import
    takes seconds: it loads torch). None where the source cannot be read that way; the full check then runs after
    the import. Read once per process: a compare config builds every planned run."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "training_args.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"]
    if len(classes) != 1 or classes[0].bases:  # inherited fields would be missed: leave it to the full check
        return None
    return frozenset(n.target.id for n in classes[0].body
                     if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    method: MethodArguments
    monitor: MonitorArguments
    training: Any  # transformers.TrainingArguments; its output_dir is RUN/checkpoints
    raw: dict = field(default_factory=dict)  # the resolved config as plain data, written to the run directory
    run_dir: Path = Path("runs/default")


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML value against a dataclass field type (int, float, str, bool, list, Optional, Union)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}.")
    if origin in (list, typing.List):
        (item,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        return [_coerce(v, item, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}.")
    return value  # enums, dicts and other TrainingArguments types: TrainingArguments validates them


def nest_overrides(flat: dict[str, Any]) -> dict:
    """{'section.key': value} -> {'section': {'key': value}}: the shape of a config file."""
    nested: dict = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def parse_overrides(overrides: list[str]) -> dict:
    flat = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"Override {item!r} is not of the form section.key=value (e.g. method.optimizer="
                              "stable-lora or training.learning_rate=2e-4).")
        key, value = item.split("=", 1)
        flat[key] = load_yaml(value) if value != "" else None
    return nest_overrides(flat)


def read_config_file(path: str | Path) -> dict:
    """A run config YAML as {section: {key: value}}, with an error that says what is wrong with the file."""
    if not Path(path).is_file():
        raise ConfigError(f"Config file '{path}' does not exist. Examples are in configs/.")
    try:
        loaded = load_yaml(Path(path).read_text(encoding="utf-8"), str(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file '{path}' must be a mapping with sections {list(SECTION_NAMES)}.")
    return loaded


def merge_config_layers(*layers: dict) -> dict:
    """Later layers win key by key within a section; no layer is modified."""
    data: dict = {}
    for layer in layers:
        for section, values in layer.items():
            data.setdefault(section, {}).update(values or {})
    return data


def _section_kwargs(section: str, cls: type, values: dict) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(section, key, fields)
        kwargs[key] = _coerce(value, hints.get(key, Any), f"{section}.{key}")
    return kwargs


def _unknown_key(section: str, key: str, names) -> ConfigError:
    return ConfigError(f"Unknown key '{section}.{key}'.{_suggest(key, names)} "
                      f"See the '{section}' keys with: stablelora train --help-keys {section}")


def _construct(section: str, cls: type, kwargs: dict):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid '{section}' settings: {err}") from err


def build_config(data: dict, output_dir: str | None = None) -> RunConfig:
    """Check and build a run config: the light sections and the training key names first, then (after importing
    transformers) the training section and the checks that need it."""
    unknown = [s for s in data if s not in SECTION_NAMES]
    if unknown:
        raise ConfigError(f"Unknown config section '{unknown[0]}'.{_suggest(unknown[0], SECTION_NAMES)} "
                          f"Sections are: {', '.join(SECTION_NAMES)}.")
    sections = {name: data.get(name) or {} for name in SECTION_NAMES}
    for name, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"Section '{name}' must be a mapping of keys to values.")
    built, raw = {}, {}
    for name, cls in LIGHT_SECTIONS.items():
        kwargs = _section_kwargs(name, cls, sections[name])
        raw[name] = {k: _plain(v) for k, v in kwargs.items()}
        built[name] = _construct(name, cls, kwargs)
    check_light_values(built)
    known_training_keys = _training_argument_names()
    for key in sections["training"] if known_training_keys else ():
        if key not in known_training_keys:
            raise _unknown_key("training", key, known_training_keys)

    from transformers import TrainingArguments

    kwargs = _section_kwargs("training", TrainingArguments, sections["training"])
    # training.output_dir names the run directory; Trainer's own checkpoints go to RUN/checkpoints
    if output_dir:
        kwargs["output_dir"] = output_dir
    kwargs.setdefault("output_dir", "runs/default")
    kwargs.setdefault("report_to", ["tensorboard"])
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")
    kwargs.setdefault("remove_unused_columns", False)  # our collators read the raw example fields
    raw["training"] = {k: _plain(v) for k, v in kwargs.items()}
    run_dir = Path(kwargs["output_dir"])
    built["training"] = _construct("training", TrainingArguments, {**kwargs, "output_dir": str(run_dir / "checkpoints")})
    check_training_values(built)
    return RunConfig(**built, raw=raw, run_dir=run_dir)


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}.")


QUANTIZATIONS = ("4bit", "8bit")


def check_quantization(model, method, training) -> None:
    """A quantized base (QLoRA) takes plain LoRA adapters: refuse what cannot work on one, with the reason."""
    if model.quantization is None:
        return
    _require(model.quantization in QUANTIZATIONS, "model.quantization", model.quantization,
             f"must be one of {', '.join(QUANTIZATIONS)} (or left out for a full-precision base)")
    from stablelora.methods import ADAPTER_OPTIONS

    options = method.adapter if isinstance(method.adapter, list) else [method.adapter]
    rewrites = [o for o in options if o in ADAPTER_OPTIONS and ADAPTER_OPTIONS[o].mutates_base]
    if rewrites:
        raise ConfigError(f"method.adapter={rewrites} with model.quantization={model.quantization}: this "
                          "initialisation rewrites the base weights (W0 - B·A), which a quantized base cannot hold "
                          "exactly. Use a full-precision base for it, or the default LoRA init on a quantized one.")
    if training.fsdp:
        raise ConfigError(f"training.fsdp with model.quantization={model.quantization}: sharding a bitsandbytes "
                          "base is not supported here. Train the quantized base on one device (or DDP), or drop "
                          "the quantization.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"model.quantization={model.quantization} needs bitsandbytes: pip install "
                          "'stablelora[qlora]' (or bitsandbytes>=0.50).") from err


def check_deepspeed(method, training) -> None:
    """What `stablelora train` runs under DeepSpeed: ZeRO-1/2 with a method that steps the fp32 masters."""
    hf_config = getattr(training, "hf_deepspeed_config", None)
    if hf_config is None:
        return
    if method.optimizer in ("lora-rite", "riemannian"):
        raise ConfigError(f"method.optimizer={method.optimizer} with training.deepspeed: this method pairs LoRA A "
                          "with B inside the optimizer, and ZeRO hands it flat partitions instead. Use stable-lora or "
                          "adamw under DeepSpeed, or shard with FSDP2 (training.fsdp).")
    if hf_config.is_zero3():
        raise ConfigError("training.deepspeed with zero_optimization.stage 3: `stablelora train` evaluates and "
                          "monitors the model's own LoRA weights, which ZeRO-3 partitions away. Use stage 1 or 2 "
                          "here (LoRA weights are small; ZeRO-2 already shards their optimizer state), or ZeRO-3 "
                          "from your own Trainer with stablelora.train.guard.use_stable_lora.")
    if method.optimizer == "stable-lora":
        from stablelora.optim.zero import check_zero_config

        try:
            check_zero_config(hf_config.config)
        except ValueError as err:
            raise ConfigError(f"training.deepspeed: {err}") from None


def check_base_optimizer(method, training) -> None:
    """The records name the method; refuse a base optimizer that would contradict that name."""
    optim = str(getattr(training.optim, "value", training.optim))
    if "adamw" not in optim and method.optimizer in ("adamw", "adamw-wd-a"):
        raise ConfigError(f"method.optimizer={method.optimizer} with training.optim={optim}: this method is LoRA on "
                          f"AdamW, so every record and table would call a {optim} run {method.optimizer}. Use an "
                          "AdamW training.optim (adamw_torch, the default; adamw_torch_fused, ...), or a method that "
                          "wraps any base optimizer (stable-lora, lora+, riemannian).")
    if "adamw" not in optim and method.optimizer == "lora-rite":
        raise ConfigError(f"method.optimizer=lora-rite with training.optim={optim}: LoRA-RITE is an optimizer of its "
                          "own and would ignore training.optim. Leave training.optim at its default.")
    if training.fsdp and method.optimizer in ("lora-rite", "riemannian"):
        from stablelora.optim.distributed import FSDP_PAIRING_MESSAGE

        raise ConfigError(f"method.optimizer={method.optimizer} with training.fsdp: {FSDP_PAIRING_MESSAGE}")


def check_light_values(built: dict[str, Any]) -> None:
    """Everything in the light sections that can be checked before a model (or transformers) is loaded: ranges,
    the dataset name, the model directory. A compare config builds every planned run, so this also checks a whole
    grid before its first run."""
    data, lora, method, monitor = (built[k] for k in ("data", "lora", "method", "monitor"))
    _require(0.0 <= method.shrink_ratio < 1.0, "method.shrink_ratio", method.shrink_ratio,
             "must be in [0, 1); the paper searches 0.0005, 0.001, 0.002, 0.005")
    _require(method.riemannian_reg > 0, "method.riemannian_reg", method.riemannian_reg, "must be > 0")
    _require(method.weight_decay_A >= 0, "method.weight_decay_A", method.weight_decay_A, "must be >= 0")
    _require(method.loraga_batches >= 1, "method.loraga_batches", method.loraga_batches, "must be >= 1")
    _require(lora.r >= 1, "lora.r", lora.r, "the LoRA rank must be >= 1")
    _require(lora.alpha > 0, "lora.alpha", lora.alpha, "must be > 0")
    _require(0.0 <= lora.dropout < 1.0, "lora.dropout", lora.dropout, "must be in [0, 1)")
    _require(lora.target_modules is None or len(lora.target_modules) > 0, "lora.target_modules",
             lora.target_modules, "name at least one module, or leave it out for the default")
    _require(monitor.every >= 1, "monitor.every", monitor.every, "must be >= 1 (optimizer steps between records)")
    _require(monitor.probe_examples >= 1, "monitor.probe_examples", monitor.probe_examples, "must be >= 1")
    for key in ("eval_size", "max_length", "max_new_tokens", "eval_batch_size"):
        _require(getattr(data, key) >= 1, f"data.{key}", getattr(data, key), "must be >= 1")
    _require(data.validation_size >= 0, "data.validation_size", data.validation_size, "must be >= 0 (0: none)")
    _require(data.max_train_examples is None or data.max_train_examples >= 1, "data.max_train_examples",
             data.max_train_examples, "must be >= 1, or left out for all")
    from stablelora.assets.models import NAMED_MODELS, check_model_dir
    from stablelora.assets.tasks import TASKS

    if data.dataset != "jsonl" and data.dataset not in TASKS:
        raise ConfigError(f"data.dataset={data.dataset!r}: unknown dataset.{_suggest(data.dataset, TASKS)} Choose "
                          f"one of {', '.join(TASKS)}, or 'jsonl' with data.train_file and data.eval_file.")
    if data.dataset == "jsonl":
        for key in ("train_file", "eval_file"):
            path = getattr(data, key)
            _require(path is not None and Path(path).is_file(), f"data.{key}", path,
                     "data.dataset=jsonl needs an existing JSONL file here")
    if built["model"].name_or_path not in NAMED_MODELS:
        try:
            check_model_dir(built["model"].name_or_path)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from err


def check_training_values(built: dict[str, Any]) -> None:
    """The checks that read the training section (a built TrainingArguments)."""
    method, training = built["method"], built["training"]
    lr = training.learning_rate
    _require(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, "training.learning_rate", lr,
             "must be a number > 0, e.g. 2e-4")
    _require(training.weight_decay >= 0, "training.weight_decay", training.weight_decay, "must be >= 0")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        _require(getattr(training, key) >= 1, f"training.{key}", getattr(training, key), "must be >= 1")
    check_deepspeed(method, training)
    check_base_optimizer(method, training)
    _require(training.max_steps != 0 and training.max_steps >= -1, "training.max_steps", training.max_steps,
             "must be > 0, or -1 to train for num_train_epochs")
    _require(training.max_steps > 0 or training.num_train_epochs > 0, "training.num_train_epochs",
             training.num_train_epochs, "must be > 0 when training.max_steps is not set")
    check_quantization(built["model"], method, training)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value)


def load_config(path: str | None, overrides: list[str] = (), output_dir: str | None = None,
                base: dict | None = None) -> RunConfig:
    file_layer = read_config_file(path) if path is not None else {}
    return build_config(merge_config_layers(base or {}, file_layer, parse_overrides(list(overrides))), output_dir)


def help_keys(section: str) -> str:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"Unknown section '{section}'; sections are {', '.join(sections)}.")
    lines = []
    for f in dataclasses.fields(sections[section]):
        if f.init:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            lines.append(f"{section}.{f.name} = {default!r}  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)
