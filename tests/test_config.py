"""Config loading: YAML + overrides into dataclasses, and one clear error per mistake."""

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from stablelora.methods import build_optimizer
from stablelora.train.config import ConfigError, help_keys, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides_resolve(tmp_path):
    path = _write(tmp_path, "method:\n  optimizer: adamw\ntraining:\n  learning_rate: 1.0e-4\n")
    cfg = load_config(path, ["method.optimizer=stable-lora", "lora.target_modules=q_proj,v_proj",
                             "training.max_steps=7"], output_dir=str(tmp_path / "run"))
    assert cfg.method.optimizer == "stable-lora"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.max_steps == 7 and cfg.training.learning_rate == 1e-4
    assert cfg.run_dir == tmp_path / "run" and cfg.training.output_dir == str(tmp_path / "run" / "checkpoints")
    assert cfg.raw["method"]["optimizer"] == "stable-lora"


def test_yaml_no_is_a_string_not_false(tmp_path):
    path = _write(tmp_path, "training:\n  save_strategy: no\n  use_cpu: true\n")
    cfg = load_config(path, ["training.eval_strategy=no", "monitor.enabled=false"], output_dir=str(tmp_path / "r"))
    assert cfg.training.save_strategy == "no" and cfg.training.eval_strategy == "no"
    assert cfg.training.use_cpu is True and cfg.monitor.enabled is False


@pytest.mark.parametrize("text, overrides, message", [
    ("methd:\n  optimizer: adamw\n", [], "Unknown config section 'methd'. Did you mean 'method'"),
    ("lora:\n  rank: 8\n", [], r"Unknown key 'lora.rank'.*--help-keys lora"),
    ("training:\n  learning_rat: 0.1\n", [], "Did you mean 'learning_rate'"),
    ("lora:\n  r: eight\n", [], "lora.r: expected an integer, got 'eight'"),
    ("method:\n  shrink_ratio: [1]\n", [], "method.shrink_ratio: expected a number"),
    ("", ["lora.r"], "not of the form section.key=value"),
    ("", ["r=8"], "not of the form section.key=value"),
    ("- a\n- b\n", [], "must be a mapping"),
    ("training:\n  lr_scheduler_type: wobbly\n", [], "Invalid 'training' settings"),
    ("method:\n  optimizer: magic\n", [], "method.optimizer: unknown method 'magic'"),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), overrides, output_dir=str(tmp_path / "run"))


def test_missing_config_file_and_help_keys(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    assert "method.shrink_ratio = 0.0005" in help_keys("method")
    with pytest.raises(ConfigError, match="Unknown section"):
        help_keys("nope")


def _needs_a_gpu_here(path: str) -> bool:
    import torch

    return "gpu" in Path(path).name and not torch.cuda.is_available()


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_every_shipped_run_config_loads(path):
    # GPU configs ask for bf16, which TrainingArguments refuses without a GPU: check every other key here
    load_config(path, ["training.bf16=false"] if _needs_a_gpu_here(path) else [], output_dir="/tmp/never-written")


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs/compare").glob("*.yaml")
                                        if p.name != "methods.yaml"))
def test_every_shipped_compare_config_loads_and_builds_all_its_runs(path, tmp_path):
    import shutil

    from stablelora.benchmark.grid import load_compare_config

    if _needs_a_gpu_here(path):
        # TrainingArguments refuses bf16 without a GPU: build every run from copies of the configs with bf16 off
        for run_config in Path("configs").glob("gpu_*.yaml"):
            data = yaml.safe_load(run_config.read_text())
            data["training"].update(bf16=False, use_cpu=True)
            (tmp_path / run_config.name).write_text(yaml.safe_dump(data))
        shutil.copytree("configs/compare", tmp_path / "compare")
        path = tmp_path / "compare" / Path(path).name
    assert load_compare_config(path).total_runs() > 0


def test_numbers_are_read_however_a_person_writes_them(tmp_path):
    path = _write(tmp_path, "training:\n  learning_rate: 1e-3\n  weight_decay: 1E-2\nmethod:\n  shrink_ratio: 5e-4\n")
    cfg = load_config(path, output_dir=str(tmp_path / "r"))
    assert cfg.training.learning_rate == 1e-3 and cfg.training.weight_decay == 0.01
    assert cfg.method.shrink_ratio == 5e-4
    cfg = load_config(path, ["training.learning_rate=2e-4", "method.shrink_ratio=.002", "training.max_steps=1_000"],
                      output_dir=str(tmp_path / "r"))
    assert cfg.training.learning_rate == 2e-4 and cfg.method.shrink_ratio == 0.002 and cfg.training.max_steps == 1000


@pytest.mark.parametrize("override, message", [
    ("method.shrink_ratio=5", r"method.shrink_ratio=5.0: must be in \[0, 1\)"),
    ("monitor.every=0", "monitor.every=0: must be >= 1"),
    ("lora.r=0", "lora.r=0: the LoRA rank must be >= 1"),
    ("data.eval_size=-5", "data.eval_size=-5: must be >= 1"),
    ("data.eval_size=0", "data.eval_size=0: must be >= 1"),
    ("training.max_steps=0", "training.max_steps=0: must be > 0, or -1"),
    ("training.learning_rate=0", "training.learning_rate=0.0: must be a number > 0"),
    ("training.learning_rate=-1e-4", "training.learning_rate=-0.0001: must be a number > 0"),
    ("training.weight_decay=-1", "training.weight_decay=-1.0: must be >= 0"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size=0: must be >= 1"),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps=0: must be >= 1"),
    ("data.dataset=openbookq", "unknown dataset. Did you mean 'openbookqa'"),
    ("data.dataset=jsonl", "data.train_file=None: data.dataset=jsonl needs an existing JSONL file"),
    ("model.name_or_path=/no/such/dir", "neither a local model directory nor a named offline model"),
])
def test_values_are_checked_when_the_config_loads_before_any_model(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], output_dir=str(tmp_path / "r"))


def test_a_model_directory_without_weights_or_model_type_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ConfigError, match="has no 'model_type'"):
        load_config(None, [f"model.name_or_path={model}"], output_dir=str(tmp_path / "r"))
    (model / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match=r"has no weights \(\*.safetensors or \*.bin\)"):
        load_config(None, [f"model.name_or_path={model}"], output_dir=str(tmp_path / "r"))


@pytest.mark.parametrize("missing, package, command, extra", [
    ("yaml", "pyyaml", ["train", "configs/smollm2_openbookqa.yaml"], "train"),
    ("matplotlib", "matplotlib", ["report", "runs/none"], "train"),
])
def test_a_command_whose_extra_is_not_installed_says_which_to_install(missing, package, command, extra):
    """`pip install stablelora` brings the optimizer only; the commands need an extra and must say so."""
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{missing!r}] = None\n"  # as when the package is not installed
            f"from stablelora.cli import main; sys.exit(main({command!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"needs the {package} package" in done.stderr and f"pip install 'stablelora[{extra}]'" in done.stderr


def test_stable_lora_with_nonzero_B_init_warns_once_per_run():
    """Checked once, where the settings are made: loading a run's config and building its optimizer used to check
    (and warn) twice."""
    from tiny import tiny_peft_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config("configs/smollm2_openbookqa.yaml", ["method.optimizer=stable-lora", "method.adapter=[pissa]"])
        model = tiny_peft_model(embedding=False)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.01}]
        build_optimizer(model, cfg.method, torch.optim.AdamW, {"lr": 1e-2}, groups, 0.01)
    assert sum("B starts non-zero" in str(w.message) for w in caught) == 1


def test_a_key_given_twice_is_refused_with_file_and_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a second training: section dropped the first whole (the learning
    rate fell back to Trainer's default), and a repeated method name in a compare config trained the wrong one."""
    from stablelora.benchmark.grid import CompareError, load_compare_config

    config = tmp_path / "run.yaml"
    config.write_text("training:\n  learning_rate: 1.0e-3\ndata:\n  dataset: piqa\ntraining:\n  max_steps: 2\n")
    with pytest.raises(ConfigError, match=rf"(?s)the key 'training' is given twice \(first on line 1\).*"
                                          rf'in "{config}", line 5'):
        load_config(str(config))
    grid = tmp_path / "compare.yaml"
    grid.write_text("base_config: run.yaml\nlearning_rates: [1.0e-4]\nseeds: [0]\nmethods:\n"
                    "  adamw: {set: {method.optimizer: adamw}}\n"
                    "  adamw: {set: {method.optimizer: stable-lora}}\n")
    with pytest.raises(CompareError, match=rf"(?s)the key 'adamw' is given twice \(first on line 5\).*line 6"):
        load_compare_config(grid)


@pytest.mark.parametrize("overrides, message", [
    (["training.optim=sgd"], "method.optimizer=adamw with training.optim=sgd: this method is LoRA on AdamW"),
    (["method.optimizer=lora-rite", "training.optim=sgd"], "LoRA-RITE is an optimizer of its own and would ignore"),
    (["method.optimizer=riemannian", "training.fsdp=full_shard"], "FSDP2 swaps both for shards afterwards"),
])
def test_a_base_optimizer_or_sharding_that_would_change_what_the_method_is_is_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, output_dir=str(tmp_path / "r"))


def test_a_method_that_wraps_any_base_optimizer_keeps_the_one_asked_for(tmp_path):
    cfg = load_config(None, ["method.optimizer=stable-lora", "training.optim=sgd"], output_dir=str(tmp_path / "r"))
    assert str(getattr(cfg.training.optim, "value", cfg.training.optim)) == "sgd"


@pytest.mark.parametrize("override, message", [
    ("data.datset=piqa", "Unknown key 'data.datset'. Did you mean 'dataset'?"),
    ("training.learnin_rate=1e-4", "Unknown key 'training.learnin_rate'. Did you mean 'learning_rate'?"),
    ("method.optimizer=stable-lor", "stable-lora"),
    ("lora.r=0", "lora.r=0: the LoRA rank must be >= 1"),
])
def test_a_typo_is_refused_before_torch_or_transformers_is_imported(override, message):
    """Importing transformers' TrainingArguments loads torch (8-40 s on these CPUs): a typo must not wait for it."""
    import subprocess
    import sys

    code = ("import sys\nfrom stablelora.cli import main\nrc = main(['train', 'configs/minilm_privacyqa.yaml', "
            f"{override!r}])\nheavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "print('heavy imports:', heavy)\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr
    assert "heavy imports: []" in done.stdout
