"""Method registry: every optimizer method builds and trains, compositions hold, bad combinations say why."""

import peft
import peft.optimizers
import pytest
import torch

from stablelora.methods import (ADAPTER_OPTIONS, OPTIMIZER_METHODS, MethodArguments, build_optimizer,
                                lora_config_kwargs, method_table)
from stablelora.optim.pairs import find_lora_pairs
from tiny import batches, tiny_peft_model, train_step

pytestmark = pytest.mark.core  # needs only torch and peft: scripts/check_wheel.sh runs it against the wheel


def _build(model, method: MethodArguments | None = None, **settings):
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.01}]
    method = method or MethodArguments(**settings)
    return build_optimizer(model, method, torch.optim.AdamW, {"lr": 1e-2}, groups, 0.01)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_METHODS))
def test_every_optimizer_method_trains_the_tiny_model(name):
    model = tiny_peft_model(embedding=False)
    if name == "riemannian" and not hasattr(peft.optimizers, "create_riemannian_optimizer"):  # peft < 0.21
        with pytest.raises(ValueError, match="riemannian needs .* pip install -U peft"):
            _build(model, optimizer=name)
        return
    opt = _build(model, optimizer=name)
    losses = [train_step(model, opt, b) for b in batches(1) * 30]  # one batch, repeated: loss must fall
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.lora_B.abs().sum() > 0 for p in find_lora_pairs(model))


def test_stable_lora_composes_with_loraplus_ratio():
    model = tiny_peft_model(embedding=False)
    opt = _build(model, optimizer="stable-lora", loraplus_lr_ratio=8.0)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    pair = find_lora_pairs(model)[0]
    assert lr[id(pair.lora_B)] == pytest.approx(8 * lr[id(pair.lora_A)])
    assert hasattr(opt, "stable_lora_status")


@pytest.mark.parametrize("optimizer", ["lora+", "stable-lora"])
def test_loraplus_decays_like_every_other_method(optimizer):
    model = tiny_peft_model(embedding=False)
    opt = _build(model, optimizer=optimizer, loraplus_lr_ratio=16.0)
    pair = find_lora_pairs(model)[0]
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(pair.lora_A)] == decay[id(pair.lora_B)] == 0.01  # PEFT's loraplus_weight_decay default is 0


def test_adamw_wd_a_puts_only_A_in_the_large_decay_group():
    model = tiny_peft_model(embedding=False)
    opt = _build(model, optimizer="adamw-wd-a", weight_decay_A=0.5)
    a_ids = {id(p.lora_A) for p in find_lora_pairs(model)}
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        assert (g["weight_decay"] == 0.5) == bool(ids & a_ids)
        assert not (g["weight_decay"] == 0.5 and ids - a_ids)


def test_adapter_options_map_to_lora_config():
    assert lora_config_kwargs(MethodArguments(adapter=["rslora", "dora"])) == {"use_rslora": True, "use_dora": True}
    assert lora_config_kwargs(MethodArguments(adapter=["pissa"]))["init_lora_weights"] == "pissa_niter_4"
    if hasattr(peft, "LoraGAConfig"):
        assert lora_config_kwargs(MethodArguments(adapter=["lora-ga"]))["init_lora_weights"] == "lora_ga"
    else:  # an older peft than the lock's: the option says what to do instead of failing in an import
        with pytest.raises(ValueError, match="lora-ga needs peft.LoraGAConfig"):
            lora_config_kwargs(MethodArguments(adapter=["lora-ga"]))


@pytest.mark.parametrize("method, message", [
    (dict(optimizer="sgd-magic"), "unknown method 'sgd-magic'"),
    (dict(adapter=["lora-xs"]), r"unknown option\(s\) \['lora-xs'\]"),
    (dict(adapter=["pissa", "olora"]), "alternative initialisations"),
    (dict(optimizer="riemannian", loraplus_lr_ratio=4.0), "builds its own single parameter group"),
    (dict(optimizer="lora-rite", loraplus_lr_ratio=4.0), "breaks that"),
    (dict(optimizer="adamw", loraplus_lr_ratio=-1.0), "must be > 0"),
    (dict(optimizer="lora+", stop_rule=False), "stop-rule ablation"),
])
def test_impossible_combinations_are_refused_with_a_reason(method, message):
    with pytest.raises(ValueError, match=message):
        MethodArguments(**method)


def test_method_table_documents_every_name():
    table = method_table()
    assert all(f"`{n}`" in table for n in list(OPTIMIZER_METHODS) + list(ADAPTER_OPTIONS))


def _loss_backward(model, batch) -> None:
    ids, target = batch
    model.zero_grad()
    torch.nn.functional.mse_loss(model(ids), target).backward()


def _with_random_B(model):
    torch.manual_seed(3)
    for pair in find_lora_pairs(model):
        pair.lora_B.data.normal_(std=0.5)
    return model


def test_stable_lora_keeps_A_below_adamws_from_the_same_seed():
    norms = {}
    for name in ("adamw", "stable-lora"):
        model = tiny_peft_model(embedding=False)
        opt = _build(model, optimizer=name, shrink_ratio=0.1)
        for batch in batches(5):
            train_step(model, opt, batch)
        norms[name] = [p.lora_A.norm().item() for p in find_lora_pairs(model)]
    assert all(s < 0.8 * a for s, a in zip(norms["stable-lora"], norms["adamw"])), norms  # 0.9^5 = 0.59


def test_lora_plus_moves_B_at_ratio_times_adamws_rate():
    """Adam's first step from B = 0 moves every entry with a gradient by exactly its learning rate."""
    steps = {}
    for name, ratio in (("adamw", None), ("lora+", 16.0)):
        model = tiny_peft_model(embedding=False)
        opt = _build(model, optimizer=name, loraplus_lr_ratio=ratio)
        train_step(model, opt, batches(1)[0])
        steps[name] = torch.cat([p.lora_B.detach().abs().flatten() for p in find_lora_pairs(model)]).mean()
    assert steps["lora+"] / steps["adamw"] == pytest.approx(16.0, rel=1e-3)


def test_riemannian_preconditions_the_gradients_of_A_and_B():
    """Over SGD, one step moves A by -lr·(BᵀB + reg·I)⁻¹·∇A and B by -lr·∇B·(AAᵀ + reg·I)⁻¹: AdamW or SGD under the
    name would not."""
    if not hasattr(peft.optimizers, "create_riemannian_optimizer"):
        pytest.skip("peft < 0.21 has no create_riemannian_optimizer")
    model, lr, reg = _with_random_B(tiny_peft_model(embedding=False)), 0.1, 0.1
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    opt = build_optimizer(model, MethodArguments(optimizer="riemannian", riemannian_reg=reg), torch.optim.SGD,
                          {"lr": lr}, groups, 0.0)
    _loss_backward(model, batches(1)[0])
    pairs = find_lora_pairs(model)
    before = [(p.lora_A.detach().clone(), p.lora_B.detach().clone(), p.lora_A.grad.clone(), p.lora_B.grad.clone())
              for p in pairs]
    opt.step()
    for pair, (a, b, grad_a, grad_b) in zip(pairs, before):
        eye = torch.eye(a.shape[0])
        expected_a = a - lr * torch.linalg.solve(b.T @ b + reg * eye, grad_a)
        expected_b = b - lr * torch.linalg.solve(a @ a.T + reg * eye, grad_b.T).T
        torch.testing.assert_close(pair.lora_A.detach(), expected_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pair.lora_B.detach(), expected_b, rtol=1e-4, atol=1e-6)


def test_lora_rite_update_of_B_A_does_not_depend_on_how_the_product_is_factored():
    """Same B·A, factored as (B, A) and (B/3, 3A): LoRA-RITE's step changes the product the same way; AdamW's does
    not (it is not invariant to rescaling the factors)."""
    products = {}
    for name in ("adamw", "lora-rite"):
        for scale in (1.0, 3.0):
            model = _with_random_B(tiny_peft_model(embedding=False))
            for pair in find_lora_pairs(model):
                pair.lora_A.data *= scale
                pair.lora_B.data /= scale
            opt = _build(model, optimizer=name)
            train_step(model, opt, batches(1)[0])
            products[name, scale] = [(p.lora_B @ p.lora_A).detach() for p in find_lora_pairs(model)]
    for one, three in zip(products["lora-rite", 1.0], products["lora-rite", 3.0]):
        torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(one, three, rtol=1e-2, atol=1e-4)
               for one, three in zip(products["adamw", 1.0], products["adamw", 3.0]))
