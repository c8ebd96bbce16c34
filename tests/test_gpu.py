"""The accelerator paths, on a real CUDA GPU (skipped elsewhere; scripts/gpu_check.sh runs them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stablelora import create_stablelora_optimizer, find_lora_pairs
from tiny import batches, tiny_llama_peft, tiny_peft_model

pytestmark = pytest.mark.gpu


def _ids(seed: int, device: str = "cuda") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (8, 12), generator=g).to(device)


@pytest.mark.parametrize("fused", [False, True])
def test_steps_never_wait_for_the_device(fused):
    """No host sync in any step, the cadence checks included (set_sync_debug_mode('error') raises on one)."""
    model = tiny_llama_peft().cuda()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=0.2, lr=1e-2, fused=fused)
    data = [_ids(i) for i in range(4 * opt.HOST_CHECK_EVERY)]
    for ids in data[:2]:  # the first steps create optimizer state (allowed to sync)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for ids in data[2:]:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stops = [s.stop_step for s in opt.stable_lora_status()]
    assert all(s is not None for s in stops) and len(opt._shrinking_layers) < len(stops), stops


def test_cuda_trajectory_matches_cpu():
    """The same run on CPU and GPU: same stop steps, parameters equal to float tolerance."""
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama_peft().to(device)
        opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=0.2, lr=1e-2)
        for i in range(40):
            ids = _ids(i, device)
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        results[device] = ([s.stop_step for s in opt.stable_lora_status()],
                           [p.detach().cpu() for p in model.parameters() if p.requires_grad])
    assert results["cuda"][0] == results["cpu"][0]
    for a, b in zip(results["cuda"][1], results["cpu"][1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_bf16_autocast_keeps_fp32_adapters_and_shrinks_exactly():
    model = tiny_llama_peft().cuda()
    pairs = find_lora_pairs(model)
    before = [p.lora_A.detach().clone() for p in pairs]
    opt = create_stablelora_optimizer(model, torch.optim.SGD, shrink_ratio=5e-4, lr=0.0)
    for i in range(3):
        ids = _ids(i)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    keep = torch.tensor(1 - 5e-4, dtype=torch.float32, device="cuda")
    for pair, a0 in zip(pairs, before):
        assert pair.lora_A.dtype == torch.float32
        assert torch.equal(pair.lora_A, a0 * keep * keep * keep), pair.name


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_grad_scaler_overflow_step_neither_shrinks_nor_counts(fused):
    model = tiny_peft_model().cuda()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=0.05, lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cuda")
    ids, target = (t.cuda() for t in batches(1)[0])
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(ids).float(), target)
    scaler.scale(loss * 1e30).backward()  # overflows in fp16 gradients or in the scaled loss
    next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(s.shrink_steps == 0 and s.shrinking for s in opt.stable_lora_status())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_on_a_second_gpu():
    """Buckets on cuda:1 while cuda:0 is current: the host copies are awaited on cuda:1's stream."""
    model = tiny_llama_peft().to("cuda:1")
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=0.2, lr=1e-2)
    for i in range(3 * opt.HOST_CHECK_EVERY):
        ids = _ids(i, "cuda:1")
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert len(opt._shrinking_layers) < len(opt.stable_lora_status())
