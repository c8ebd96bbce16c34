"""Stable-LoRA under DDP and FSDP2 (CPU, gloo, 2 processes) equals the single-process run."""

import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

import distributed_workers as w


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, *args, world: int = 2) -> None:
    """Run ``worker(rank, world, port, *args)`` on ``world`` spawned gloo ranks and wait for all of them.

    A rank error fails the test at once. A hang never blocks the run: ranks print their stacks and exit after
    ``w.RANK_DEADLINE_S``, and are killed a little later. A run that only ended through those timeouts (a
    peer's collective timed out, or the deadline struck) is a hang, not a result; gloo's thread and the GIL can
    deadlock a rank (pytorch/pytorch#56297), so such a run is started once more, with a warning, and a second
    hang fails the test. Wrong results are never retried."""
    for attempt in (1, 2):
        start = time.monotonic()
        ranks = mp.start_processes(worker, args=(world, _free_port(), *args), nprocs=world, join=False,
                                   start_method="spawn")
        try:
            while not ranks.join(timeout=5):
                if time.monotonic() - start > w.RANK_DEADLINE_S + 30:
                    for process in ranks.processes:
                        process.kill()
                        process.join()
                    raise ProcessException("the ranks were killed at the deadline", 0, ranks.processes[0].pid)
            return
        except ProcessException as error:
            elapsed = time.monotonic() - start
            if elapsed < w.COLLECTIVE_TIMEOUT.total_seconds() or attempt == 2:
                raise
            warnings.warn(f"{worker.__name__}: the ranks hung ({error}, after {elapsed:.0f} s; their stacks are "
                          "in the captured output); starting them once more")


@pytest.fixture(scope="module")
def reference():
    return w.single_process_reference()


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_ddp_two_processes_equal_single_process(tmp_path, reference):
    out = tmp_path / "ddp.pt"
    run_ranks(w.ddp_worker, str(out))
    got = torch.load(out, weights_only=True)
    stops = reference["stops"]
    assert any(s is not None for s in stops) and len({s for s in stops if s}) >= 2, stops
    assert got["stops"] == stops
    assert got["tracked"][-1] < got["tracked"][0]  # layers left the buckets, on the same step on both ranks:
    assert torch.load(f"{out}.tracked0") == torch.load(f"{out}.tracked1") == got["tracked"]
    assert all(not n.startswith("module.") for n in got["names"])  # DDP's prefix is not shown
    _close(got["params"], reference["params"])


def test_fsdp2_equals_single_process_and_resumes_exactly(tmp_path, reference):
    out, ckpt = tmp_path / "fsdp2.pt", tmp_path / "ckpt"
    run_ranks(w.fsdp2_worker, str(out), str(ckpt))
    got = torch.load(out, weights_only=True)
    assert (2, 32) in [tuple(s) for s in got["local_shapes"]]  # A (4 x 32) really is sharded over 2 ranks
    assert got["straight"]["stops"] == reference["stops"]
    assert got["straight"]["tracked"][-1] < got["straight"]["tracked"][0]
    assert torch.load(f"{out}.tracked0") == torch.load(f"{out}.tracked1") == got["straight"]["tracked"]
    _close(got["straight"]["params"], reference["params"])
    assert got["after_load"] == got["at_half"]  # flags and stop steps restored from the DCP checkpoint
    assert got["resumed"]["stops"] == got["straight"]["stops"]
    for name, value in got["straight"]["params"].items():
        assert torch.equal(value, got["resumed"]["params"][name]), name


def test_fsdp1_is_refused_with_the_alternative():
    # FSDP1 cannot be built on a CPU-only machine ("FSDP needs a non-CPU accelerator"), so these mark the model
    # the way FSDP1 does: a FlatParameter is a Parameter flagged _is_flat_param; the wrapper is an FSDP module.
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParameter

    from stablelora import create_stablelora_optimizer
    from tiny import tiny_llama_peft

    model = tiny_llama_peft()
    flat = torch.nn.Parameter(torch.zeros(8))
    flat._is_flat_param = True
    assert isinstance(flat, FlatParameter)
    model.register_parameter("flat", flat)
    with pytest.raises(ValueError, match="use_orig_params=False.*fsdp_version: 2"):
        create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=1e-3)

    model = tiny_llama_peft()
    wrapper = object.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    model.add_module("fsdp1", wrapper)
    with pytest.raises(ValueError, match=r"FSDP1 \(use_orig_params=True\).*Use FSDP2"):
        create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=1e-3)


def test_trainer_with_the_factory_under_accelerate_fsdp2_matches_one_process(tmp_path):
    """The path users take: Trainer builds the optimizer (factory), Accelerate shards the model with FSDP2 and swaps
    the optimizer's parameters for DTensors. Two gloo processes must train exactly as one, stop steps included."""
    single, sharded = tmp_path / "one.pt", tmp_path / "two.pt"
    w.trainer_worker(0, 1, 0, str(single))
    run_ranks(w.trainer_worker, str(sharded))
    one, two = torch.load(single, weights_only=True), torch.load(sharded, weights_only=True)
    assert two["sharded"] == "DTensor" and one["sharded"] == "Parameter"
    stops = one["stops"]
    assert all(s is not None for s in stops) and len(set(stops)) >= 2, stops
    assert two["stops"] == stops
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5)
    _close(two["params"], one["params"])
    assert len(two["monitor"]) == len(one["monitor"]) == w.TRAINER_STEPS // 4
    assert torch.allclose(torch.tensor(two["monitor"], dtype=torch.float64),
                          torch.tensor(one["monitor"], dtype=torch.float64), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_riemannian_under_accelerate_fsdp2_is_refused_before_it_trains_as_adamw(tmp_path):
    """PEFT's Riemannian optimizer captures (A, B) when built; FSDP2 then swaps both for shards, and the captured
    tensors never get a gradient: it would train as plain AdamW. StableLoRATrainer refuses it."""
    out = tmp_path / "riemannian"
    run_ranks(w.fsdp2_pairing_method_worker, str(out), "riemannian")
    assert "method.optimizer=riemannian under FSDP" in torch.load(out, weights_only=True)


@pytest.mark.slow
def test_stablelora_train_under_accelerate_fsdp2_saves_a_whole_adapter(tmp_path):
    """The run writes its adapter from every rank's shards (a rank-0 save_pretrained of DTensors crashed)."""
    import json

    from safetensors.torch import load_file

    run = tmp_path / "run"
    run_ranks(w.stablelora_train_fsdp2_worker, str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["stable_lora"]["layers"] == 37
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    query_a = next(t for k, t in adapter.items() if "layer.0.attention.self.query.lora_A" in k)
    assert query_a.shape == (8, 384) and torch.isfinite(query_a).all()
    assert len((run / "monitor.jsonl").read_text().splitlines()) == 2
    assert (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
