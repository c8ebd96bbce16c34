"""StabilityMonitor: how LoRA's A and B evolve per layer, and the balance of the two first-order output updates.

For a LoRA layer y = W0 x + s B A x, one optimizer step changes the output by
    delta1 = s * dB @ A @ x      (the A-path: B learns through the current A)
    delta2 = s * B @ dA @ x      (the B-path: A learns through the current B)
    delta3 = s * dB @ dA @ x     (second order)
The Stable-LoRA paper's theory is about their balance: with A random and B = 0, delta1 dominates for the whole
run unless A is shrunk. Every ``every`` optimizer steps the monitor runs one extra forward pass of a fixed probe
batch to capture each layer's input x, snapshots A and B, and after the step records per layer:
||A||_F, ||B||_F, ||A||_F/in, ||B||_F/out, the shrink status and stop step (Stable-LoRA optimizers), and the RMS
of delta1 and delta2 over the probe tokens. Records go to ``monitor.jsonl``; summaries (fraction of layers still
shrinking, median stop step, median delta1/delta2) go to TensorBoard and the training log.

Plain PyTorch:   monitor = StabilityMonitor(model, probe, every=10, output_dir=run_dir)
                 for step: monitor.before_step(step, optimizer); ...backward...; optimizer.step();
                           monitor.after_step(step, optimizer)
HF Trainer:      trainer.add_callback(monitor)   (it is a TrainerCallback)
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from stablelora.optim.distributed import full_tensor
from stablelora.optim.pairs import LoraPair, find_lora_pairs


def module_type(module_name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'q_proj'; 'encoder.layer.0.attention.output.dense' -> 'attention.output.dense'."""
    parts = [p for p in module_name.split(".") if not p.isdigit()]
    if len(parts) >= 2 and parts[-1] == "dense":  # BERT-style names: the parent says which dense it is
        return ".".join(parts[-3:] if len(parts) >= 3 and parts[-3] == "attention" else parts[-2:])
    return parts[-1] if parts else module_name


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


class StabilityMonitor(TrainerCallback):
    """Records per-layer LoRA norms, shrink status and the delta1/delta2 split every ``every`` optimizer steps.

    With ``output_dir`` every record is appended to ``monitor.jsonl`` there, and its summary is written as
    TensorBoard scalars under ``tb/monitor`` when ``tensorboard`` is True, or None (the default) and the tensorboard
    package is installed: the core install does not bring it.
    """

    def __init__(self, model: nn.Module, probe_batch: dict[str, torch.Tensor], *, every: int = 10,
                 output_dir: str | Path | None = None, max_probe_tokens: int = 256, tensorboard: bool | None = None):
        if every < 1:
            raise ValueError(f"StabilityMonitor: every must be >= 1, got {every}.")
        installed = importlib.util.find_spec("tensorboard") is not None
        if tensorboard and not installed:
            raise ImportError("StabilityMonitor(tensorboard=True) needs the tensorboard package: pip install "
                              "tensorboard (or stablelora[train]), or pass tensorboard=None to write monitor.jsonl only.")
        self.tensorboard = installed if tensorboard is None else tensorboard
        self.model = model
        find_lora_pairs(model)  # fail now, not at the first monitored step, if the model has no trainable LoRA
        self.every = every
        self.probe = {k: v for k, v in probe_batch.items() if k != "labels"}
        self.max_probe_tokens = max_probe_tokens
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.records: list[dict] = []
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._writer = None

    def _layers(self) -> list[tuple[LoraPair, nn.Module, float]]:
        """Each LoRA pair with its layer (for its input) and scaling s, found afresh in the model: FSDP2 and other
        wrappers replace the parameters after the monitor is built, so none is kept between steps."""
        owner = {}
        for module in self.model.modules():
            for adapter, weights in list(getattr(module, "lora_A", {}).items()):
                owner[id(weights.weight)] = (module, adapter)
            for adapter, weight in list(getattr(module, "lora_embedding_A", {}).items()):
                owner[id(weight)] = (module, adapter)
        layers = []
        for pair in find_lora_pairs(self.model):
            module, adapter = owner[id(pair.lora_A)]
            layers.append((pair, module, float(module.scaling[adapter])))
        return layers

    # ------------------------------------------------------------------ plain-loop API
    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def before_step(self, step: int, optimizer=None) -> None:
        """Call before ``optimizer.step()`` of step ``step`` (0-based); snapshots only on monitored steps."""
        if not self.due(step):
            self._snapshot = None
            return
        inputs: dict[str, torch.Tensor] = {}
        hooks = []
        layers = self._layers()
        for pair, module, _ in layers:

            def capture(mod, args, key=pair.name):
                x = args[0].detach()
                inputs[key] = x.reshape(-1, x.shape[-1])[: self.max_probe_tokens]

            hooks.append(module.register_forward_pre_hook(capture))
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            self.model(**{k: v.to(device) for k, v in self.probe.items()})
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        self._snapshot = {pair.name: (full_tensor(pair.lora_A).clone(), full_tensor(pair.lora_B).clone(), inputs.get(pair.name))
                          for pair, _, _ in layers}

    @torch.no_grad()
    def after_step(self, step: int, optimizer=None) -> dict | None:
        """Call after ``optimizer.step()``; returns (and stores) the record of a monitored step."""
        if self._snapshot is None:
            return None
        status = {}
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is not None and hasattr(inner, "stable_lora_status"):
            status = {s.name: s for s in inner.stable_lora_status()}
        layers = []
        for pair, _, scale in self._layers():
            a0, b0, x = self._snapshot[pair.name]
            a1, b1 = full_tensor(pair.lora_A), full_tensor(pair.lora_B)
            layer = {
                "name": pair.name, "type": module_type(pair.module_name),
                "in": pair.in_features, "out": pair.out_features,
                "a_norm": float(a1.norm()), "b_norm": float(b1.norm()),
            }
            layer["a_per_in"] = layer["a_norm"] / pair.in_features
            layer["b_per_out"] = layer["b_norm"] / pair.out_features
            if x is not None and a0.dim() == 2 and x.shape[-1] == a0.shape[1] and x.is_floating_point():
                xa = x.to(a0.dtype) @ a0.T                       # (tokens, r): A_t x
                delta1 = scale * xa @ (b1 - b0).T                 # s dB A x
                delta2 = scale * (x.to(a0.dtype) @ (a1 - a0).T) @ b0.T  # s B dA x
                layer["delta1"], layer["delta2"] = _rms(delta1), _rms(delta2)
            if pair.name in status:
                layer["shrinking"] = status[pair.name].shrinking
                layer["stop_step"] = status[pair.name].stop_step
            layers.append(layer)
        record = {"step": step + 1, "layers": layers, "summary": summarise(layers)}
        self._snapshot = None
        self.records.append(record)
        self._write(record)
        return record

    # ------------------------------------------------------------------ output
    def _write(self, record: dict) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "monitor.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if not self.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / "tb" / "monitor"))
        for key, value in record["summary"].items():
            if value is not None:
                self._writer.add_scalar(f"stability/{key}", value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ TrainerCallback
    def on_step_begin(self, args, state, control, **kwargs):
        self.before_step(state.global_step, kwargs.get("optimizer"))

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step(state.global_step - 1, kwargs.get("optimizer"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.records:
            for key, value in self.records[-1]["summary"].items():
                # StableLoRATrainer logs the optimizer's current shrinking fraction itself; the monitor's is as of
                # its last monitored step, so it stays in monitor.jsonl and tb/monitor only
                if value is not None and key != "shrinking_fraction":
                    logs[f"stability/{key}"] = value

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


def summarise(layers: list[dict]) -> dict[str, Any]:
    ratios = [l["delta1"] / l["delta2"] for l in layers if l.get("delta2")]
    flags = [l["shrinking"] for l in layers if "shrinking" in l]
    stops = [l["stop_step"] for l in layers if l.get("stop_step") is not None]
    return {
        "shrinking_fraction": sum(flags) / len(flags) if flags else None,
        "median_stop_step": statistics.median(stops) if stops else None,
        "median_delta_ratio": statistics.median(ratios) if ratios else None,
        "median_a_per_in": statistics.median(l["a_per_in"] for l in layers),
        "median_b_per_out": statistics.median(l["b_per_out"] for l in layers),
    }
