"""What a comparison runs: the compare YAML, checked up front, and the plan of runs it implies.

A compare config names a base run config and, per method, the ``section.key`` values that define the method and the
values to tune (the learning rate and anything else, e.g. ``method.shrink_ratio`` or ``lora.alpha``). The plan is
built in stages, because later runs depend on earlier results:

1. tune: every setting (learning rate x tuned values) of a method on ``tune_seeds`` (with ``sweep: true``, these
   runs are also reported: the test metric against the learning rate, per method, over the tune seeds);
2. seeds: the setting with the best *validation* score on the remaining ``seeds`` (the report seeds);
3. variants: named changes of a method (a lambda sweep, the stop-rule ablation) at that method's chosen setting,
   on the report seeds.
Test scores are reported on the report seeds only: a tune seed's run at the chosen setting is the one whose
validation score won, so its test score carries a winner's curse that grows with the size of the grid.
The baseline goes first, so a partial grid always has something to compare against.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stablelora.assets.tasks import eval_set_names, task_family
from stablelora.eval import HIGHER_IS_BETTER, JUDGED_METRICS, judged_metrics
from stablelora.reporting.stats import select_on_validation
from stablelora.train.config import (ConfigError, build_config, load_yaml, merge_config_layers, nest_overrides,
                                     read_config_file)

LEARNING_RATE = "training.learning_rate"
SEED = "training.seed"
TOP_KEYS = {"extends", "base_config", "output_dir", "overrides", "baseline", "learning_rates", "tune_seeds", "seeds", "metric",
            "higher_is_better", "methods", "variants", "description", "sweep"}


class CompareError(ValueError):
    """A compare config or results directory that cannot be used as it is; the message says how to fix it."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    settings_fixed: dict[str, Any]  # section.key -> value for every run of the method
    tuned: dict[str, list]  # section.key -> candidate values, chosen on validation together with the learning rate

    def settings(self) -> list[dict[str, Any]]:
        keys = list(self.tuned)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.tuned[k] for k in keys))]


@dataclass(frozen=True)
class VariantSpec:
    name: str
    of: str  # the method whose chosen setting the variant starts from
    changes: dict[str, Any]
    group: str


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    method: str  # a method or a variant name
    role: str  # "tune", "seed" or "variant"
    setting: dict[str, Any]  # the tuned values (learning rate included) this run used
    seed: int
    overrides: dict[str, Any]  # every section.key value the run adds to the base config


@dataclass
class CompareConfig:
    path: Path
    base_config: Path
    base_config_sha256: str
    output_dir: Path
    overrides: dict[str, Any]
    baseline: str
    tune_seeds: list[int]
    seeds: list[int]
    metric: str | None  # "EVAL/KEY"; None: the task's headline metric
    higher_is_better: bool
    methods: dict[str, MethodSpec]
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    description: str = ""
    sweep: bool = False  # report the test metric at every setting over the tune seeds, not only at the chosen one

    @property
    def records_dir(self) -> Path:
        return self.output_dir / "records"

    @property
    def runs_dir(self) -> Path:
        return self.output_dir / "runs"

    @property
    def report_seeds(self) -> list[int]:
        """The seeds that did not choose a setting: the reported test scores come from these only."""
        return [s for s in self.seeds if s not in self.tune_seeds]

    def total_runs(self) -> int:
        per_method = sum(len(m.settings()) * len(self.tune_seeds) + len(self.report_seeds)
                         for m in self.methods.values())
        return per_method + len(self.variants) * len(self.report_seeds)


def rate_label(rate: float) -> str:
    """The shortest scientific notation that reads back as exactly this rate (1e-04, 1.5e-04, 2.5e-04), so that
    two rates never share a label or a run id."""
    return next(text for digits in range(17) if float(text := f"{rate:.{digits}e}") == rate)


def setting_label(setting: dict[str, Any]) -> str:
    """'lr=5e-04, shrink_ratio=0.002': short keys, for tables and run names."""
    parts = []
    for key, value in setting.items():
        short = "lr" if key == LEARNING_RATE else key.split(".", 1)[1]
        parts.append(f"{short}={rate_label(value)}" if key == LEARNING_RATE else f"{short}={_plain(value)}")
    return ", ".join(parts)


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _ascii(text: str) -> str:
    """Accents dropped (é -> e) and other letters spelled by their Unicode name (λ -> lamda)."""
    letters = []
    for char in unicodedata.normalize("NFKD", text):
        if char.isascii():
            letters.append(char)
        elif not unicodedata.combining(char):
            letters.append(unicodedata.name(char, "_").split()[-1].lower())
    return "".join(letters)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", _ascii(text)).strip("_")


def run_id(method: str, setting: dict[str, Any], seed: int) -> str:
    """A run's name, readable and safe as a file name: method, setting and seed."""
    return f"{_slug(method)}__{_slug(setting_label(setting))}__seed{seed}"


def _check_unique_run_ids(cfg: CompareConfig) -> None:
    """Every run the config can plan gets its own id; two that shared one would share a record."""
    names: dict[str, str] = {}
    runs = [(m.name, s) for m in cfg.methods.values() for s in m.settings()]
    runs += [(v.name, s) for v in cfg.variants.values() for s in cfg.methods[v.of].settings()]
    for name, setting in runs:
        for seed in cfg.seeds:
            rid, described = run_id(name, setting, seed), f"'{name}' at {setting_label(setting)}, seed {seed}"
            if rid in names:
                raise CompareError(f"{cfg.path}: {names[rid]} and {described} would both be named '{rid}'; "
                                   "rename one of the methods or variants.")
            names[rid] = described


def _section_keys(mapping: Any, where: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise CompareError(f"{where} must be a mapping of section.key: value, got {mapping!r}.")
    for key in mapping:
        if not isinstance(key, str) or "." not in key:
            raise CompareError(f"{where}: '{key}' is not of the form section.key (e.g. method.shrink_ratio).")
        if key in (SEED, "training.output_dir"):
            raise CompareError(f"{where}: '{key}' is set by the harness (seeds: ..., output_dir: ...); remove it.")
    return dict(mapping)


def _numbers(value: Any, where: str, kind: type) -> list:
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                       for v in value):
        raise CompareError(f"{where} must be a non-empty list of numbers, got {value!r}.")
    if kind is int and any(not isinstance(v, int) for v in value):
        raise CompareError(f"{where} must be a list of integers, got {value!r}.")
    if len(set(value)) != len(value):
        raise CompareError(f"{where} lists a value twice: {value!r}.")
    return [kind(v) for v in value]


def _read_compare_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The YAML of a compare config with ``extends`` resolved: the parent's keys, then this file's on top
    (``overrides`` merged key by key). Paths are resolved against the file that names them."""
    if not path.is_file():
        raise CompareError(f"Compare config '{path}' does not exist. Examples: configs/compare/.")
    if path.resolve() in chain:
        raise CompareError(f"{path}: 'extends' loops back to itself ({' -> '.join(map(str, chain))}).")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as err:
        raise CompareError(f"Compare config '{path}' is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise CompareError(f"Compare config '{path}' must be a mapping (keys: {', '.join(sorted(TOP_KEYS))}).")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise CompareError(f"{path}: unknown key(s) {unknown}; the keys are {sorted(TOP_KEYS)}.")
    if "base_config" in data:
        data["base_config"] = str((path.parent / data["base_config"]).resolve())
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    parent = _read_compare_yaml((path.parent / parent_name).resolve(), (*chain, path.resolve()))
    merged = {**parent, **data}
    merged["overrides"] = {**(parent.get("overrides") or {}), **(data.get("overrides") or {})}
    # a task config restates only what it changes of an inherited method (e.g. its learning_rates for a task whose
    # best rates lie elsewhere); methods it names that the parent lacks are added after the parent's
    parent_methods, own_methods = parent.get("methods") or {}, data.get("methods") or {}
    if isinstance(parent_methods, dict) and isinstance(own_methods, dict) and own_methods:
        merged["methods"] = {**parent_methods}
        for name, spec in own_methods.items():
            inherited = parent_methods.get(name)
            both_maps = isinstance(inherited, dict) and isinstance(spec, dict)
            merged["methods"][name] = {**inherited, **spec} if both_maps else spec
    return merged


def load_compare_config(path: str | Path, output_dir: str | None = None) -> CompareConfig:
    """Read and check a compare YAML; every run's config is built once here, so a typo fails now, not hours in."""
    path = Path(path)
    data = _read_compare_yaml(path)
    for key in ("base_config", "methods", "learning_rates", "seeds"):
        if key not in data:
            raise CompareError(f"{path}: '{key}' is required.")
    base = Path(data["base_config"])
    if not base.is_file():
        raise CompareError(f"{path}: base_config not found: {base} (a path relative to the compare config that "
                           "names it).")
    learning_rates = _numbers(data["learning_rates"], f"{path}: learning_rates", float)
    seeds = _numbers(data["seeds"], f"{path}: seeds", int)
    tune_seeds = _numbers(data.get("tune_seeds", seeds[:1]), f"{path}: tune_seeds", int)
    if not set(tune_seeds) <= set(seeds):
        raise CompareError(f"{path}: tune_seeds {tune_seeds} must be among seeds {seeds}, so tuning runs are reused.")
    sweep = data.get("sweep", False)
    if not isinstance(sweep, bool):
        raise CompareError(f"{path}: sweep must be true or false, got {sweep!r}.")
    if sweep and len(tune_seeds) < 2:
        raise CompareError(f"{path}: sweep: true reports every rate with an interval over tune_seeds, which needs at "
                           f"least 2 of them (got {tune_seeds}); e.g. tune_seeds: [0, 1, 2].")
    if set(seeds) == set(tune_seeds):
        raise CompareError(f"{path}: seeds {seeds} must add seeds beyond tune_seeds {tune_seeds}: test scores are "
                           "reported on seeds that did not choose the setting (e.g. tune_seeds: [0], seeds: [0, 1, 2]).")
    methods_data = data["methods"]
    if not isinstance(methods_data, dict) or not methods_data:
        raise CompareError(f"{path}: methods must map names to their settings (see configs/compare/).")
    methods = {}
    for name, spec in methods_data.items():
        spec = spec or {}
        where = f"{path}: methods.{name}"
        if not isinstance(spec, dict) or set(spec) - {"set", "tune", "learning_rates"}:
            raise CompareError(f"{where} may have only 'set', 'tune' and 'learning_rates', got {spec!r}.")
        tuned = {LEARNING_RATE: _numbers(spec.get("learning_rates", learning_rates), f"{where}.learning_rates",
                                         float)}
        for key, values in _section_keys(spec.get("tune"), f"{where}.tune").items():
            if not isinstance(values, list) or not values:
                raise CompareError(f"{where}.tune.{key} must be a non-empty list of candidate values.")
            tuned[key] = values
        methods[name] = MethodSpec(name, _section_keys(spec.get("set"), f"{where}.set"), tuned)
    baseline = data.get("baseline", "adamw")
    if baseline not in methods:
        raise CompareError(f"{path}: baseline '{baseline}' is not one of the methods {list(methods)}.")
    methods = {baseline: methods[baseline], **{k: v for k, v in methods.items() if k != baseline}}
    variants = {}
    for name, spec in (data.get("variants") or {}).items():
        where = f"{path}: variants.{name}"
        if not isinstance(spec, dict) or "of" not in spec or set(spec) - {"of", "set", "group"}:
            raise CompareError(f"{where} needs 'of' (a method) and 'set', optionally 'group'; got {spec!r}.")
        if spec["of"] not in methods:
            raise CompareError(f"{where}.of: '{spec['of']}' is not one of the methods {list(methods)}.")
        if name in methods:
            raise CompareError(f"{where}: the name is already a method's.")
        variants[name] = VariantSpec(name, spec["of"], _section_keys(spec.get("set"), f"{where}.set"),
                                     str(spec.get("group", "variants")))
    metric = data.get("metric")
    if metric is not None and (not isinstance(metric, str) or metric.count("/") != 1):
        raise CompareError(f"{path}: metric must be 'EVAL/KEY' (e.g. gsm-symbolic/answer_token_loss), got {metric!r}.")
    known = HIGHER_IS_BETTER.get(metric.split("/")[1]) if metric else None
    higher = data.get("higher_is_better", True if known is None else known)
    if not isinstance(higher, bool):
        raise CompareError(f"{path}: higher_is_better must be true or false.")
    if known is not None and higher != known:
        raise CompareError(f"{path}: metric '{metric}' is better when {'higher' if known else 'lower'}, but "
                           f"higher_is_better is {str(higher).lower()}. Remove higher_is_better (it follows a "
                           f"known metric) or set it to {str(known).lower()}.")
    out = output_dir or data.get("output_dir")
    if not out:
        raise CompareError(f"{path}: set output_dir (or pass --output-dir).")
    cfg = CompareConfig(
        path=path, base_config=base, base_config_sha256=hashlib.sha256(base.read_bytes()).hexdigest(),
        output_dir=Path(out), overrides=_section_keys(data.get("overrides"), f"{path}: overrides"),
        baseline=baseline, tune_seeds=tune_seeds, seeds=seeds, metric=metric, higher_is_better=higher,
        methods=methods, variants=variants, description=str(data.get("description", "")).strip(), sweep=sweep)
    _check_unique_run_ids(cfg)
    _check_runs_build(cfg)
    return cfg


def _check_runs_build(cfg: CompareConfig) -> None:
    """Build the run config of every method setting and variant, so bad keys or values fail before any run."""
    tunes = any(len(m.settings()) > 1 for m in cfg.methods.values())
    for method in cfg.methods.values():
        for setting in method.settings():
            run_cfg = _build(cfg, method.name, overrides_for(cfg, method, setting, cfg.seeds[0]))
            if tunes and not run_cfg.data.validation_size:
                raise CompareError(f"{cfg.path}: settings are chosen on a validation split, but data.validation_size "
                                   "is 0. Set overrides: {data.validation_size: N} (examples held out of train).")
    for variant in cfg.variants.values():
        method = cfg.methods[variant.of]
        _build(cfg, variant.name, {**overrides_for(cfg, method, method.settings()[0], cfg.seeds[0]),
                                   **variant.changes})


def _build(cfg: CompareConfig, name: str, overrides: dict[str, Any]):
    try:
        run_cfg = load_config_with(cfg.base_config, overrides)
    except ConfigError as err:
        raise CompareError(f"{cfg.path}: the runs of '{name}' would not start: {err}") from err
    _check_metric(cfg, name, run_cfg.data)
    return run_cfg


def _check_metric(cfg: CompareConfig, name: str, data) -> None:
    """A metric the runs will not report would fail only after the first run; the eval set names and the scores
    each task family reports are known before any run."""
    if cfg.metric is None:
        return
    family = task_family(data.dataset, data.format)
    if family not in JUDGED_METRICS:
        return  # a JSONL format the task load refuses, with its own message
    available = [f"{e}/{k}" for e in eval_set_names(data.dataset, data.train_file)
                 for k in judged_metrics(family, data.generate)]
    if cfg.metric not in available:
        raise CompareError(f"{cfg.path}: metric '{cfg.metric}' is not reported by the runs of '{name}' "
                           f"({data.dataset}, {family}); choose one of {available}.")


def merged_config(base_config: Path, overrides: dict[str, Any]) -> dict:
    """The base YAML with ``section.key`` overrides applied: what one run of the grid trains with."""
    return merge_config_layers(read_config_file(base_config), nest_overrides(overrides))


def load_config_with(base_config: Path, overrides: dict[str, Any]):
    return build_config(merged_config(base_config, overrides))


def overrides_for(cfg: CompareConfig, method: MethodSpec, setting: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**cfg.overrides, **method.settings_fixed, **setting, SEED: seed}


def chosen_setting(cfg: CompareConfig, method: MethodSpec, records: dict[str, dict]) -> dict[str, Any] | None:
    """The setting with the best mean validation score over the tune seeds; None until all its tuning runs exist."""
    settings = method.settings()
    tuning = [records.get(run_id(method.name, s, seed)) for s in settings for seed in cfg.tune_seeds]
    if any(r is None for r in tuning):
        return None
    if len(settings) == 1:
        return settings[0]
    # a setting that diverged on any tune seed failed: it cannot be chosen
    failed = {r["setting_label"] for r in tuning if r.get("diverged")}
    labels = {setting_label(s): s for s in settings if setting_label(s) not in failed}
    if not labels:
        raise CompareError(f"{cfg.path}: every setting of method '{method.name}' diverged while tuning; move its "
                           "learning rates down (methods.<name>.learning_rates) and run again.")
    if len(labels) == 1:
        return next(iter(labels.values()))
    rows = [{"setting": r["setting_label"], "seed": r["seed"], "validation": r["validation"]} for r in tuning
            if r["setting_label"] in labels]
    return labels[select_on_validation(rows, key="setting", higher_is_better=cfg.higher_is_better)]


def plan(cfg: CompareConfig, records: dict[str, dict]) -> list[PlannedRun]:
    """Every run that can be named given the records so far, in execution order (finished ones included)."""
    runs: list[PlannedRun] = []
    chosen: dict[str, dict] = {}
    for method in cfg.methods.values():
        for setting in method.settings():
            for seed in cfg.tune_seeds:
                runs.append(PlannedRun(run_id(method.name, setting, seed), method.name, "tune", setting, seed,
                                       overrides_for(cfg, method, setting, seed)))
        best = chosen_setting(cfg, method, records)
        if best is None:
            continue
        chosen[method.name] = best
        for seed in cfg.report_seeds:
            runs.append(PlannedRun(run_id(method.name, best, seed), method.name, "seed", best, seed,
                                   overrides_for(cfg, method, best, seed)))
    for variant in cfg.variants.values():
        if variant.of not in chosen:
            continue
        best = chosen[variant.of]
        for seed in cfg.report_seeds:
            overrides = {**overrides_for(cfg, cfg.methods[variant.of], best, seed), **variant.changes}
            runs.append(PlannedRun(run_id(variant.name, best, seed), variant.name, "variant", best, seed, overrides))
    if cfg.sweep:  # tuning first, seed by seed, every method side by side at each rate: a partial sweep is paired
        method_order = {name: i for i, name in enumerate(cfg.methods)}
        tune = sorted((r for r in runs if r.role == "tune"), key=lambda r: (
            r.seed, cfg.methods[r.method].settings().index(r.setting), method_order[r.method]))
        runs = tune + [r for r in runs if r.role != "tune"]
    return runs


def planned_records(cfg: CompareConfig, records: dict[str, dict]) -> dict[str, dict]:
    """The records the current plan names: what the results are made of."""
    names = {r.run_id for r in plan(cfg, records)}
    return {key: record for key, record in records.items() if key in names}
