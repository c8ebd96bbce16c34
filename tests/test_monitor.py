"""StabilityMonitor numbers against a hand computation, and its Trainer/run integration."""

import importlib.util
import json
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from stablelora import create_stablelora_optimizer
from stablelora.diagnostics.monitor import StabilityMonitor, module_type

pytestmark = pytest.mark.core  # needs only torch and peft: scripts/check_wheel.sh runs it against the wheel


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.proj(x)


def _one_monitored_sgd_step(model, x: torch.Tensor, output_dir) -> dict:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    monitor = StabilityMonitor(model, {"x": x}, every=1, output_dir=output_dir)
    monitor.before_step(0, opt)
    model(x).pow(2).sum().backward()
    opt.step()
    record = monitor.after_step(0, opt)
    monitor.close()
    return record


def test_norms_and_delta_split_match_a_hand_computation(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(OneLayer(), LoraConfig(r=2, lora_alpha=6, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # non-zero B so both paths are non-trivial
    a0 = layer.lora_A["default"].weight.detach().clone()
    b0 = layer.lora_B["default"].weight.detach().clone()
    x = torch.randn(3, 4, 6)
    record = _one_monitored_sgd_step(model, x, tmp_path)

    a1, b1 = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = 6 / 2
    tokens = x.reshape(-1, 6)
    delta1 = s * tokens @ a0.T @ (b1 - b0).T
    delta2 = s * tokens @ (a1 - a0).T @ b0.T
    (got,) = record["layers"]
    assert got["name"] == "proj[default]" and got["type"] == "proj" and record["step"] == 1
    assert got["a_norm"] == pytest.approx(a1.norm().item()) and got["b_norm"] == pytest.approx(b1.norm().item())
    assert got["a_per_in"] == pytest.approx(a1.norm().item() / 6) and got["b_per_out"] == pytest.approx(b1.norm().item() / 5)
    assert got["delta1"] == pytest.approx(delta1.pow(2).mean().sqrt().item(), rel=1e-5)
    assert got["delta2"] == pytest.approx(delta2.pow(2).mean().sqrt().item(), rel=1e-5)
    assert record["summary"]["median_delta_ratio"] == pytest.approx(got["delta1"] / got["delta2"])
    written = [json.loads(l) for l in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert written == [record]
    if importlib.util.find_spec("tensorboard"):  # TensorBoard scalars beside the jsonl, where it is installed
        assert list((tmp_path / "tb" / "monitor").glob("events.out.tfevents*"))


def test_without_tensorboard_the_monitor_writes_its_jsonl_and_refuses_only_an_explicit_request(tmp_path, monkeypatch):
    """The core install has no tensorboard: the monitor must still record (it used to fail at the first record)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails, as when not installed
    model = get_peft_model(OneLayer(), LoraConfig(r=2, target_modules=["proj"]))
    x = torch.randn(3, 4, 6)
    _one_monitored_sgd_step(model, x, tmp_path)
    assert len((tmp_path / "monitor.jsonl").read_text().splitlines()) == 1 and not (tmp_path / "tb").exists()
    with pytest.raises(ImportError, match="pip install tensorboard"):
        StabilityMonitor(model, {"x": x}, output_dir=tmp_path, tensorboard=True)


def test_only_due_steps_are_recorded_and_stable_lora_status_is_read():
    from tiny import batches, tiny_peft_model

    model = tiny_peft_model(embedding=False)
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=0.05, lr=1e-2)
    ids = batches(1)[0][0]
    monitor = StabilityMonitor(model, {"ids": ids}, every=5)
    for step, (ids_b, target) in enumerate(batches(20)):
        monitor.before_step(step, opt)
        opt.zero_grad()
        nn.functional.mse_loss(model(ids_b), target).backward()
        opt.step()
        monitor.after_step(step, opt)
    assert [r["step"] for r in monitor.records] == [1, 6, 11, 16]
    last = monitor.records[-1]
    assert all("shrinking" in l for l in last["layers"])
    assert last["summary"]["shrinking_fraction"] == sum(l["shrinking"] for l in last["layers"]) / 3
    assert monitor.records[0]["layers"][0]["delta1"] == 0.0 or monitor.records[0]["layers"][0]["delta1"] > 0
    logs = {}
    monitor.on_log(None, None, None, logs=logs)
    # the Trainer logs the optimizer's own, current fraction (stable_lora/shrinking_fraction); the monitor's, from
    # its last monitored step, would be a second, stale figure under another name
    assert "stability/median_a_per_in" in logs and "stability/shrinking_fraction" not in logs


@pytest.mark.parametrize("name, kind", [("model.layers.3.self_attn.q_proj", "q_proj"),
                                        ("encoder.layer.0.attention.output.dense", "attention.output.dense"),
                                        ("encoder.layer.5.output.dense", "output.dense")])
def test_module_type(name, kind):
    assert module_type(name) == kind


def test_bad_interval():
    from tiny import tiny_peft_model

    with pytest.raises(ValueError, match="every must be >= 1"):
        StabilityMonitor(tiny_peft_model(), {}, every=0)
