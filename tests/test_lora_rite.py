"""LoRA-RITE: the property it exists for (transformation invariance) and that it trains a real PEFT model."""

import pytest
import torch

from stablelora.optim.lora_rite import LoRARITE
from stablelora.optim.pairs import LoraPair, find_lora_pairs
from tiny import batches, swap_like_accelerate_fsdp2, tiny_peft_model, train_step

pytestmark = pytest.mark.core  # needs only torch and peft: scripts/check_wheel.sh runs it against the wheel


def _delta_z(a0, b0, target, steps=3):
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    opt = LoRARITE([a, b], [LoraPair("toy", "default", a, b)], lr=1e-2)
    z0 = (b @ a).detach().clone()
    for _ in range(steps):
        opt.zero_grad()
        ((b @ a - target) ** 2).sum().backward()
        opt.step()
    return (b @ a).detach() - z0


def test_update_of_the_product_is_invariant_to_rescaling_and_rotating_the_factors():
    g = torch.Generator().manual_seed(0)
    a, b, target = torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g), torch.randn(7, 10, generator=g)
    reference = _delta_z(a, b, target)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    transform = q @ torch.diag(torch.tensor([3.0, 0.5, 1.7]))  # B A = (B T^-1)(T A)
    other = _delta_z(transform @ a, b @ torch.linalg.inv(transform), target)
    assert torch.allclose(reference, other, rtol=1e-3, atol=1e-5)
    # Adam is not invariant: the same check fails for it, so the test can tell the two apart
    a1, b1 = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    a2, b2 = torch.nn.Parameter((transform @ a).clone()), torch.nn.Parameter((b @ torch.linalg.inv(transform)).clone())
    deltas = []
    for x, y in ((a1, b1), (a2, b2)):
        opt = torch.optim.Adam([x, y], lr=1e-2)
        z0 = (y @ x).detach().clone()
        ((y @ x - target) ** 2).sum().backward()
        opt.step()
        deltas.append((y @ x).detach() - z0)
    assert not torch.allclose(deltas[0], deltas[1], rtol=1e-3, atol=1e-5)


def test_trains_a_peft_model_from_zero_B_and_resumes():
    model = tiny_peft_model(embedding=False)
    pairs = find_lora_pairs(model)
    opt = LoRARITE([p for p in model.parameters() if p.requires_grad], pairs, lr=1e-2, weight_decay=0.01)
    losses = [train_step(model, opt, b) for b in batches(60)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])
    assert any(p.lora_B.abs().sum() > 0 for p in pairs)
    state = opt.state_dict()
    clone = tiny_peft_model(embedding=False)
    clone.load_state_dict(model.state_dict())
    clone_opt = LoRARITE([p for p in clone.parameters() if p.requires_grad], find_lora_pairs(clone), lr=1e-2,
                         weight_decay=0.01)
    clone_opt.load_state_dict(state)
    for b in batches(5, seed=9):
        train_step(model, opt, b)
        train_step(clone, clone_opt, b)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_a_parameter_swap_after_building_is_refused_not_silently_adamw():
    """Under Trainer + FSDP2 the factors would be swapped for shards; LoRA-RITE would then update them as AdamW."""
    built_on, trained = tiny_peft_model(), tiny_peft_model()
    opt = LoRARITE([p for p in built_on.parameters() if p.requires_grad], find_lora_pairs(built_on), lr=1e-2)
    swap_like_accelerate_fsdp2(opt, built_on, trained)
    with pytest.raises(RuntimeError, match="LoRA-RITE: the LoRA factors it was built with are no longer"):
        train_step(trained, opt, batches(1)[0])
