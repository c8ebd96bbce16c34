"""The width-scaling check runs at a reduced size, and its exponent fit is right on exact power laws."""

import re

import pytest

from stablelora.cli import main
from stablelora.diagnostics.theory import PREDICTED, fit_exponent, run_theory


def test_fit_exponent_recovers_a_power_law():
    widths = [64, 128, 256, 512]
    assert fit_exponent(widths, [3.0 * w**0.5 for w in widths]) == pytest.approx(0.5)
    assert fit_exponent(widths, [7.0 for _ in widths]) == pytest.approx(0.0, abs=1e-12)


def test_reduced_theory_run_produces_every_variant_and_a_verdict():
    results, fits, verdicts = run_theory((32, 64, 128), steps=40, tail=10, progress=False)
    assert {r.variant for r in results} == set(PREDICTED) and len(results) == 9
    assert all(r.early[1] > 0 and r.late[1] > 0 and r.late[2] > 0 for r in results)
    assert any(r.stopped_at for r in results if r.variant == "stable-lora")
    assert len(verdicts) == 6 and all(
        re.search(r"the balance (AGREES|DISAGREES);.*the exponents (AGREE|DISAGREE) with", v) for v in verdicts)


def test_theory_command_writes_table_and_plot(tmp_path, capsys):
    assert main(["theory", "--widths", "32,64", "--steps", "20", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "theory.png").stat().st_size > 10_000
    assert "| variant | n |" in (tmp_path / "theory.md").read_text()
    assert main(["theory", "--widths", "32", "--output", str(tmp_path)]) == 2
    assert "at least two widths" in capsys.readouterr().err
