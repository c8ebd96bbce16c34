"""Stable-LoRA under DeepSpeed ZeRO-1/2/3 through HF Trainer, on 2 gloo ranks, against a DDP run of the same Trainer.

The optimizer is built the way users get it (``use_stable_lora``: Trainer's ``create_optimizer`` calls the factory
from ``deepspeed_init``), and DeepSpeed flattens, shards and copies back as it always does. A silent fallback to the
base optimizer, or a shrink that ZeRO undoes, would end on other weights than the DDP run of Stable-LoRA.
"""

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (pip install '.[deepspeed]')")

import deepspeed_workers as d  # noqa: E402
from test_distributed import run_ranks  # noqa: E402

pytestmark = pytest.mark.slow


def _launch(tmp_path, name: str, config, *args) -> list[dict]:
    out = tmp_path / name
    run_ranks(d.trainer_worker, str(out), config, *args)
    return [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    ranks = _launch(tmp_path_factory.mktemp("ddp"), "ddp", None)
    stops = ranks[0]["stops"]
    assert all(s is not None for s in stops) and len(set(stops)) >= 2, stops  # every layer stops, not all at once
    return ranks


def _assert_sharded(ranks: list[dict], full: int = 4 * 32) -> None:
    """Each rank trained on its own batches, and held only part of the A masters: every A once over the ranks
    (ZeRO-1/2 partition the flat buffer, so a small A sits on one rank; ZeRO-3 splits each)."""
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    for name in ranks[0]["slices"]:
        assert sum(r["slices"][name] for r in ranks) == full, name
    total = full * len(ranks[0]["slices"])
    assert all(0 < sum(r["slices"].values()) < total for r in ranks)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_train_bit_identical_to_ddp(tmp_path, ddp, stage):
    ranks = _launch(tmp_path, f"zero{stage}", d.zero_config(stage))
    assert ranks[0]["wrapped"][-2:] == ["DeepSpeedZeroOptimizer", "StableLoRAAdamW"]
    _assert_sharded(ranks)
    assert ranks[0]["stops"] == ranks[1]["stops"] == ddp[0]["stops"]
    assert _max_difference(ranks[0]["masters"], ddp[0]["masters"]) == 0.0


def test_zero_3_matches_ddp(tmp_path, ddp):
    ranks = _launch(tmp_path, "zero3", d.zero_config(3))
    assert ranks[0]["wrapped"][-2:] == ["DeepSpeedZeroOptimizer_Stage3", "StableLoRAAdamW"]
    _assert_sharded(ranks)
    assert ranks[0]["stops"] == ranks[1]["stops"] == ddp[0]["stops"]
    assert _max_difference(ranks[0]["masters"], ddp[0]["masters"]) < 1e-6


def test_bf16_zero_2_shrinks_the_fp32_masters(tmp_path):
    """The model trains in bf16 (where a 0.8x shrink of A would survive, but the masters would overwrite it):
    what must shrink is ZeRO's fp32 master, which then is smaller than without Stable-LoRA's shrink."""
    shrunk = _launch(tmp_path, "bf16", d.zero_config(2, bf16=True))
    plain = _launch(tmp_path, "bf16_no_shrink", d.zero_config(2, bf16=True), 0.0)
    assert shrunk[0]["model_dtype"] == "torch.bfloat16"
    assert all(s is not None for s in shrunk[0]["stops"]) and plain[0]["stops"] == [None] * 4
    for name, master in shrunk[0]["masters"].items():
        if "lora_A" in name:
            assert master.dtype == torch.float32
            assert master.norm() < 0.5 * plain[0]["masters"][name].norm(), name


@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_checkpoint_resumes_bit_identical(tmp_path, stage):
    """Saved after step 7, when half the layers had stopped (v_proj at step 7): a resume that lost the flags
    would shrink them again."""
    straight = _launch(tmp_path, "straight", d.zero_config(stage), d.SHRINK, 7)
    assert sorted(straight[0]["stops"]) == [7, 7, 8, 8]
    checkpoint = tmp_path / "straight.trainer" / "checkpoint-7"
    saved = torch.load(next((checkpoint / "global_step7").glob("*rank_0*optim_states.pt")), weights_only=False)
    inner = saved["optimizer_state_dict"]
    inner = inner.get("base_optimizer_state", inner.get("optimizer_state_dict"))
    assert inner["stable_lora"]["stable_lora_shrinking"].tolist() == [True, False, True, False]
    resumed = _launch(tmp_path, "resumed", d.zero_config(stage), d.SHRINK, 0, str(checkpoint))
    assert resumed[0]["stops"] == straight[0]["stops"]
    assert _max_difference(resumed[0]["masters"], straight[0]["masters"]) == 0.0


def test_every_silent_deepspeed_path_is_refused_before_training(tmp_path):
    out = tmp_path / "refusals"
    run_ranks(d.refusal_worker, str(out), world=1)
    got = torch.load(out, weights_only=True)
    block = 'ValueError: Stable-LoRA under DeepSpeed: the DeepSpeed config has an "optimizer" block'
    assert got["use_stable_lora, optimizer block"].startswith(block)
    assert got["mixin, optimizer block"].startswith(block)
    assert got["factory with the guard, optimizer block"].startswith(block)
    for case in ("use_stable_lora, offload", "factory, offload"):
        assert "replace the optimizer by DeepSpeedCPUAdam" in got[case] and \
            '"zero_force_ds_cpu_optimizer": false' in got[case], got[case]
    assert '"round_robin_gradients": false' in got["use_stable_lora, round robin"]
    for method in ("lora-rite", "riemannian"):
        assert f"method.optimizer={method} under DeepSpeed ZeRO" in got[f"mixin, {method}"]
    assert got["pre-built optimizer with the guard"].startswith(
        "RuntimeError: Stable-LoRA was asked for, but the optimizer this Trainer steps is DeepSpeedOptimizerWrapper "
        "-> DeepSpeedZeroOptimizer -> AdamW")


def test_stablelora_train_under_zero_2_checkpoints_resumes_and_saves_the_fp32_adapter(tmp_path):
    """`stablelora train` with training.deepspeed (ZeRO-2) on the demo's real model: a run killed after its step-2
    checkpoint and resumed ends with the same adapter, evaluation and monitor as the run that went straight on."""
    import json
    import shutil

    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(d.stablelora_train_worker, str(straight), False, 4)
    shutil.copytree(straight, resumed)  # then remove what a run killed right after checkpoint-2 would not have
    for name in ("metrics.json", "stable_lora_status.json", "log_history.json"):
        (resumed / name).unlink()
    for name in ("adapter", "checkpoints/checkpoint-4"):
        shutil.rmtree(resumed / name)
    run_ranks(d.stablelora_train_worker, str(resumed), True, 4)

    metrics = [json.loads((run / "metrics.json").read_text()) for run in (straight, resumed)]
    assert metrics[1]["resumed_from"].endswith("checkpoint-2") and metrics[1]["train_steps"] == 4
    assert metrics[0]["eval_after"] == metrics[1]["eval_after"]
    assert metrics[0]["stable_lora"]["layers"] == 37
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, resumed)]
    assert all(t.dtype == torch.float32 for t in adapters[0].values())
    assert _max_difference(adapters[0], adapters[1]) == 0.0
    # what only Stable-LoRA does: between the records at steps 1 and 3, every A shrank by (1 - 0.05)^2
    records = [json.loads(line) for line in (straight / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3]
    ratios = [b["a_norm"] / a["a_norm"] for a, b in zip(records[0]["layers"], records[1]["layers"])]
    assert all(0.89 < r < 0.915 for r in ratios), ratios
