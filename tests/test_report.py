"""stablelora report on stored run directories (two short real MiniLM runs: adamw and stable-lora)."""

import json
import shutil
import statistics
from pathlib import Path

import pytest

from stablelora.cli import main
from stablelora.reporting.report import ReportError, load_run, write_report

RUNS = Path(__file__).parent / "data" / "runs"


def test_report_writes_every_plot_and_a_summary(tmp_path):
    report = write_report([RUNS / "adamw", RUNS / "stable-lora"], tmp_path)
    text = report.read_text()
    for name in ("norms.png", "shrinking.png", "stop_steps.png", "delta_ratio.png", "loss.png", "eval.png"):
        assert (tmp_path / name).stat().st_size > 5_000, name
        assert f"]({name})" in text
    assert "| adamw |" in text and "| stable-lora |" in text
    assert not list(tmp_path.glob(".*tmp*"))


def test_resumed_run_records_are_deduplicated_by_step(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUNS / "stable-lora", run)
    lines = (run / "monitor.jsonl").read_text().splitlines()
    (run / "monitor.jsonl").write_text("\n".join(lines + lines[-2:]) + "\n")  # as after a resume
    assert [r["step"] for r in load_run(run).records] == [r["step"] for r in load_run(RUNS / "stable-lora").records]


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    with pytest.raises(ReportError, match="is not a directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(ReportError, match="is not a run directory"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "monitor.jsonl").write_text('{not json\n{"step": 1}\n')
    with pytest.raises(ReportError, match="monitor.jsonl:1 is not valid JSON"):
        load_run(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    for name in ("metrics.json", "stable_lora_status.json", "log_history.json", "config.yaml"):
        run = tmp_path / name.replace(".", "-")
        shutil.copytree(RUNS / "stable-lora", run)
        (run / name).write_text('{"cut off": [1, 2')  # changed or cut by another tool
        with pytest.raises(ReportError, match=f"{name} cannot be read .*leave that run out"):
            load_run(run)
        assert main(["report", str(run), "--output", str(tmp_path / "out")]) == 2
        assert f"{name} cannot be read" in capsys.readouterr().err


def test_a_run_without_monitor_data_is_reported_with_what_it_has(tmp_path):
    run = tmp_path / "no-monitor"
    shutil.copytree(RUNS / "adamw", run)
    (run / "monitor.jsonl").unlink()
    report = write_report([run, RUNS / "stable-lora"], tmp_path / "out").read_text()
    assert "no-monitor: adamw: no monitor data" in report
    assert (tmp_path / "out" / "loss.png").exists() and (tmp_path / "out" / "norms.png").exists()
    alone = write_report([run], tmp_path / "alone").read_text()
    assert "](loss.png)" in alone and "](norms.png)" not in alone


def test_a_truncated_last_monitor_line_is_dropped(tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(RUNS / "stable-lora", run)
    text = (run / "monitor.jsonl").read_text()
    (run / "monitor.jsonl").write_text(text + text.splitlines()[-1][:40])  # killed while appending
    assert len(load_run(run).records) == len(load_run(RUNS / "stable-lora").records)


@pytest.mark.slow
def test_the_demo_ends_with_its_report(tmp_path, capsys):
    """The main job shows what Stable-LoRA did: norms, the shrinking fraction, stop steps and both loss curves."""
    from stablelora.demo import run_demo

    run_demo(str(tmp_path), steps=6, overrides=["data.eval_size=16", "training.logging_steps=1", "monitor.every=2",
                                                "method.shrink_ratio=0.3", "training.disable_tqdm=true"])
    report = tmp_path / "report" / "report.md"
    assert f"Report: {report} with the pictures " in capsys.readouterr().out
    text = report.read_text()
    assert "| adamw |" in text and "| stable-lora |" in text
    pictures = {p.name for p in report.parent.glob("*.png")}
    assert {"norms.png", "shrinking.png", "stop_steps.png", "loss.png"} <= pictures, pictures
    assert all(f"]({name})" in text for name in pictures)


def test_stops_are_counted_when_training_ended_not_at_the_monitors_last_sample(tmp_path):
    """The monitor samples every few steps; a layer that stops after its last sample must still count (a run's
    report said 26 of 60 layers stopped where its optimizer had 30 at the end)."""
    run = tmp_path / "stable-lora"
    shutil.copytree(RUNS / "stable-lora", run)
    last = load_run(run).records[-1]
    layers = [{"name": l["name"], "type": l["type"], "in": l["in"], "out": l["out"], "stop_step": l["stop_step"]}
              for l in last["layers"]]
    still_shrinking = [l for l in layers if l["stop_step"] is None]
    still_shrinking[0]["stop_step"] = still_shrinking[1]["stop_step"] = last["step"] + 2  # after the last sample
    (run / "stable_lora_status.json").write_text(json.dumps({"per_layer": layers}))
    stopped = len(layers) - len(still_shrinking) + 2
    steps = json.loads((run / "metrics.json").read_text())["train_steps"]
    assert steps > last["step"]

    report = write_report([run], tmp_path / "out").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| stable-lora"))
    assert f"| {stopped}/{len(layers)} ({steps}) |" in row, row
    median = statistics.median(l["stop_step"] for l in layers if l["stop_step"] is not None)
    assert f"| {median} |" in row, row
