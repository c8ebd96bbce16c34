"""Stable-LoRA optimizer: exact semantics, state round trip, composition and every error path."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch import nn

from stablelora import create_stablelora_optimizer, find_lora_pairs
from reference import ReferenceStableLoRA
from tiny import TinyNet, batches, swap_like_accelerate_fsdp2, tiny_peft_model, train_step

pytestmark = pytest.mark.core  # needs only torch and peft: scripts/check_wheel.sh runs it against the wheel


ADAMW = dict(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999))
LAMBDA = 0.05  # large enough that the tiny model's layers stop at different steps within 120 steps


def adamw_reference(model: nn.Module) -> ReferenceStableLoRA:
    return ReferenceStableLoRA(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW),
                               LAMBDA)


def ours_and_reference(model: nn.Module):
    """Stable-LoRA (AdamW, LAMBDA) on ``model``, and the reference on an exact copy of it."""
    ref_model = copy.deepcopy(model)
    ours = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    return ours, ref_model, adamw_reference(ref_model)


def train_both(model: nn.Module, opt, ref_model: nn.Module, ref: ReferenceStableLoRA, steps: int) -> None:
    for batch in batches(steps):
        train_step(model, opt, batch)
        train_step(ref_model, ref, batch)


def assert_same_params(m1: nn.Module, m2: nn.Module) -> None:
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), f"{n1} differs"


def test_trajectory_equals_reference_over_120_steps_with_staggered_stops():
    ours_model = tiny_peft_model()
    ours, ref_model, ref = ours_and_reference(ours_model)
    for t, batch in enumerate(batches(120), start=1):
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
        if t % 10 == 0:
            assert_same_params(ours_model, ref_model)
    assert_same_params(ours_model, ref_model)
    ours_stops = [s.stop_step for s in ours.stable_lora_status()]
    assert ours_stops == list(ref.stop_step.values())
    stopped = [s for s in ours_stops if s is not None]
    assert len(set(stopped)) >= 3, f"test needs layers stopping at different steps, got {ours_stops}"
    assert max(stopped) > 10


def test_shrink_ratio_zero_is_exactly_the_base_optimizer():
    for cls, kwargs in ((torch.optim.AdamW, ADAMW), (torch.optim.SGD, dict(lr=0.1, momentum=0.9))):
        ours_model, base_model = tiny_peft_model(), tiny_peft_model()
        ours = create_stablelora_optimizer(ours_model, cls, shrink_ratio=0.0, **kwargs)
        base = cls([p for p in base_model.parameters() if p.requires_grad], **kwargs)
        for batch in batches(40):
            train_step(ours_model, ours, batch)
            train_step(base_model, base, batch)
        assert_same_params(ours_model, base_model)


def test_one_step_with_zero_lr_shrinks_exactly_the_shrinking_layers():
    model = tiny_peft_model()
    with torch.no_grad():  # give the embedding LoRA a non-zero A and zero B, so it shrinks too
        model.base_model.model.embed.lora_embedding_A["default"].normal_()
        model.base_model.model.embed.lora_embedding_B["default"].zero_()
    before = {p.name: p.lora_A.detach().clone() for p in find_lora_pairs(model)}
    opt = create_stablelora_optimizer(model, torch.optim.SGD, shrink_ratio=0.25, lr=0.0)
    train_step(model, opt, batches(1)[0])
    for pair in find_lora_pairs(model):
        assert torch.equal(pair.lora_A, before[pair.name] * 0.75), pair.name
    assert all(s.shrinking and s.shrink_steps == 1 for s in opt.stable_lora_status())


def test_without_the_stop_rule_every_A_shrinks_at_every_step():
    """The ablation: layers whose stop rule holds at once (B non-zero) keep shrinking when the rule is off."""
    steps, ratio = 6, 0.1
    results = {}
    for stop_rule in (True, False):
        model = tiny_peft_model()
        with torch.no_grad():
            for pair in find_lora_pairs(model):
                pair.lora_B.normal_()  # ||B|| large: the stop rule holds at step 1 for every layer
        before = {p.name: p.lora_A.detach().clone() for p in find_lora_pairs(model)}
        opt = create_stablelora_optimizer(model, torch.optim.SGD, shrink_ratio=ratio, lr=0.0, stop_rule=stop_rule)
        for batch in batches(steps):
            train_step(model, opt, batch)
        results[stop_rule] = opt.stable_lora_status()
        for pair in find_lora_pairs(model):
            expected = before[pair.name].clone()
            for _ in range(0 if stop_rule else steps):
                expected.mul_(1 - ratio)
            assert torch.equal(pair.lora_A, expected), (stop_rule, pair.name)
    assert all(s.stop_step == 1 for s in results[True])
    assert all(s.shrinking and s.shrink_steps == steps for s in results[False])
    with pytest.raises(ValueError, match="stop_rule must be true or false"):
        create_stablelora_optimizer(tiny_peft_model(), shrink_ratio=0.1, stop_rule="no")


def _save(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    return buf.getvalue()


def _load(blob: bytes):
    saved = torch.load(io.BytesIO(blob), weights_only=True)
    model = tiny_peft_model(seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    opt.load_state_dict(saved["optim"])
    return model, opt


def test_resume_from_state_dicts_is_bit_identical():
    data = batches(120)
    straight = tiny_peft_model()
    straight_opt = create_stablelora_optimizer(straight, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    for batch in data:
        train_step(straight, straight_opt, batch)

    first = tiny_peft_model()
    first_opt = create_stablelora_optimizer(first, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    for batch in data[:30]:
        train_step(first, first_opt, batch)
    blob = _save(first, first_opt)
    resumed, resumed_opt = _load(blob)
    assert resumed_opt.stable_lora_status() == first_opt.stable_lora_status()
    for batch in data[30:]:
        train_step(resumed, resumed_opt, batch)
    assert_same_params(resumed, straight)
    assert resumed_opt.stable_lora_status() == straight_opt.stable_lora_status()


def test_stopped_layer_stays_stopped_after_resume_even_if_its_condition_no_longer_holds():
    model = tiny_peft_model()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    for batch in batches(20):
        train_step(model, opt, batch)
    status = {s.name: s for s in opt.stable_lora_status()}
    stopped = next(p for p in find_lora_pairs(model) if not status[p.name].shrinking and "mid" in p.name)
    with torch.no_grad():  # B = 0 would make the rule say "shrink" again
        stopped.lora_B.zero_()
    blob = _save(model, opt)
    resumed, resumed_opt = _load(blob)

    plain_model = copy.deepcopy(resumed)
    plain = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], **ADAMW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True)["optim"])
    batch = batches(1, seed=7)[0]
    train_step(resumed, resumed_opt, batch)
    train_step(plain_model, plain, batch)
    a_ours = dict(resumed.named_parameters())
    a_plain = dict(plain_model.named_parameters())
    name = next(n for n, p in resumed.named_parameters() if n.endswith("mid.lora_A.default.weight"))
    assert torch.equal(a_ours[name], a_plain[name]), "a stopped layer was shrunk after resume"
    after = {s.name: s for s in resumed_opt.stable_lora_status()}
    assert not after[stopped.name].shrinking
    assert after[stopped.name].stop_step == status[stopped.name].stop_step


def test_state_dict_carries_layer_status_and_leaves_base_state_untouched():
    model = tiny_peft_model()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    sd = opt.state_dict()  # before any step: must not plant entries that stop Adam's lazy initialisation
    assert len(opt.state) == 0
    a_index = [i for i, p in enumerate(opt.param_groups[0]["params"]) if p is find_lora_pairs(model)[1].lora_A][0]
    assert sd["state"][a_index]["stable_lora_shrinking"].dtype == torch.bool
    train_step(model, opt, batches(1)[0])
    sd = opt.state_dict()
    assert {"exp_avg", "stable_lora_shrinking", "stable_lora_shrink_steps"} <= set(sd["state"][a_index])
    assert "stable_lora_shrinking" not in opt.state[find_lora_pairs(model)[1].lora_A]


def test_loading_a_plain_optimizer_checkpoint_warns_and_starts_shrinking():
    model = tiny_peft_model()
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
    train_step(model, plain, batches(1)[0])
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    with pytest.warns(UserWarning, match="saved by a plain optimizer"):
        opt.load_state_dict(plain.state_dict())
    assert all(s.shrinking and s.shrink_steps == 0 for s in opt.stable_lora_status())


def _reference_loraplus(model, ratio):
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=ratio, weight_decay=0.01)


def test_composes_with_loraplus_groups():
    ours_model, ref_model = tiny_peft_model(embedding=False), tiny_peft_model(embedding=False)
    groups = _reference_loraplus(ours_model, 4.0).param_groups
    ours = create_stablelora_optimizer(ours_model, torch.optim.AdamW, shrink_ratio=LAMBDA, params=groups)
    lr_of = {id(p): g["lr"] for g in ours.param_groups for p in g["params"]}
    for pair in find_lora_pairs(ours_model):
        assert lr_of[id(pair.lora_B)] == pytest.approx(4 * lr_of[id(pair.lora_A)])
    ref = ReferenceStableLoRA(ref_model, _reference_loraplus(ref_model, 4.0), LAMBDA)
    for batch in batches(60):
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
    assert_same_params(ours_model, ref_model)


def test_multiple_adapters_pair_within_each_adapter_and_skip_frozen_ones():
    model = tiny_peft_model(embedding=False)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["up", "mid"], init_lora_weights="gaussian"))
    assert {p.adapter for p in find_lora_pairs(model)} == {"default"}  # "second" is inactive, hence frozen
    model.base_model.set_adapter(["default", "second"])
    pairs = find_lora_pairs(model)
    assert sorted(p.name for p in pairs) == sorted(
        ["up[default]", "mid[default]", "down[default]", "up[second]", "mid[second]"])
    modules = dict(model.base_model.model.named_modules())
    for pair in pairs:
        layer = modules[pair.module_name]
        assert pair.lora_A is layer.lora_A[pair.adapter].weight
        assert pair.lora_B is layer.lora_B[pair.adapter].weight
    opt, ref_model, ref = ours_and_reference(model)
    train_both(model, opt, ref_model, ref, 60)
    assert_same_params(model, ref_model)


def test_embedding_and_conv_lora_are_paired_with_their_sizes():
    pairs = {p.module_name: p for p in find_lora_pairs(tiny_peft_model())}
    assert (pairs["embed"].in_features, pairs["embed"].out_features, pairs["embed"].rank) == (40, 16, 4)
    conv = get_peft_model(nn.Sequential(nn.Conv2d(3, 10, 3)), LoraConfig(r=2, target_modules=["0"]))
    (pair,) = find_lora_pairs(conv)
    assert (pair.in_features, pair.out_features, pair.rank) == (27, 10, 2)


def test_dora_magnitude_and_modules_to_save_train_without_shrink():
    torch.manual_seed(0)
    model = get_peft_model(TinyNet(), LoraConfig(r=4, target_modules=["up", "mid"], use_dora=True,
                                                 modules_to_save=["head"]))
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert all(id(p) in optimized for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    train_step(model, opt, batches(1)[0])
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert any("lora_magnitude_vector" in n for n in changed) and any("modules_to_save" in n for n in changed)


def test_stopped_layers_leave_at_a_fixed_cadence_then_step_is_the_base_step():
    """The host drops a layer at the second check after it stopped (it reads the mask copied one check earlier):
    the same step on every rank. Until then the stopped layer's factor is exactly 1."""
    model = tiny_peft_model(embedding=False)
    with torch.no_grad():  # big B: every layer meets the stop rule on the first step
        for pair in find_lora_pairs(model):
            pair.lora_B.normal_(std=10.0)
    base_model = copy.deepcopy(model)
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    base = torch.optim.AdamW([p for p in base_model.parameters() if p.requires_grad], **ADAMW)
    every = opt.HOST_CHECK_EVERY
    for t, batch in enumerate(batches(2 * every + 3), start=1):
        train_step(model, opt, batch)
        train_step(base_model, base, batch)
        assert opt.all_stopped == (t >= 2 * every), t
    assert [s.stop_step for s in opt.stable_lora_status()] == [1, 1, 1]
    assert_same_params(model, base_model)


def test_per_group_shrink_ratio_and_runtime_change_are_honoured():
    model = tiny_peft_model(embedding=False)
    pairs = find_lora_pairs(model)
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q.lora_A for q in pairs)]
    groups = [{"params": [pairs[0].lora_A], "shrink_ratio": 0.5}, {"params": [q.lora_A for q in pairs[1:]] + others}]
    opt = create_stablelora_optimizer(model, torch.optim.SGD, shrink_ratio=0.1, params=groups, lr=0.0)
    a0, a1 = pairs[0].lora_A.detach().clone(), pairs[1].lora_A.detach().clone()
    train_step(model, opt, batches(1)[0])
    assert torch.equal(pairs[0].lora_A, a0 * 0.5) and torch.equal(pairs[1].lora_A, a1 * 0.9)
    opt.param_groups[1]["shrink_ratio"] = 0.2
    train_step(model, opt, batches(1)[0])
    assert torch.equal(pairs[1].lora_A, a1 * 0.9 * 0.8)
    opt.param_groups[1]["shrink_ratio"] = 1.5
    with pytest.raises(ValueError, match=r"shrink_ratio of parameter group 1 must be a number in \[0, 1\)"):
        train_step(model, opt, batches(1)[0])


def test_closure_is_evaluated_before_the_shrink_and_its_loss_returned():
    ours_model = tiny_peft_model()
    ours, ref_model, ref = ours_and_reference(ours_model)
    for ids, target in batches(10):
        def closure():
            ours.zero_grad()
            loss = nn.functional.mse_loss(ours_model(ids), target)
            loss.backward()
            return loss
        loss = ours.step(closure)
        assert loss.item() == pytest.approx(train_step(ref_model, ref, (ids, target)))
    assert_same_params(ours_model, ref_model)


def test_step_hooks_run_once_per_step_and_class_is_a_base_subclass():
    model = tiny_peft_model()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    train_step(model, opt, batches(1)[0])
    assert calls == ["pre", "post"]
    assert isinstance(opt, torch.optim.AdamW)
    other = create_stablelora_optimizer(tiny_peft_model(), torch.optim.AdamW, shrink_ratio=LAMBDA)
    assert type(other) is type(opt)


# ----------------------------------------------------------------------------------------------- errors


def test_error_no_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layer.*get_peft_model"):
        create_stablelora_optimizer(TinyNet(), shrink_ratio=0.001)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, math.nan, "0.001", True, None])
def test_error_shrink_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match=r"shrink_ratio must be a number in \[0, 1\)"):
        create_stablelora_optimizer(tiny_peft_model(), shrink_ratio=bad)


def test_error_frozen_factor_names_the_module():
    model = tiny_peft_model()
    model.base_model.model.mid.lora_A["default"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'mid' adapter 'default': lora_A is frozen"):
        create_stablelora_optimizer(model, shrink_ratio=0.001)


def test_error_A_without_B_names_the_module():
    model = tiny_peft_model()
    del model.base_model.model.down.lora_B["default"]
    with pytest.raises(ValueError, match=r"'down' adapter 'default' has no lora_B"):
        create_stablelora_optimizer(model, shrink_ratio=0.001)


def test_error_all_adapters_frozen():
    model = tiny_peft_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="none is trainable"):
        create_stablelora_optimizer(model, shrink_ratio=0.001)


def test_error_foreign_parameters():
    model = tiny_peft_model()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad] + [nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ValueError, match="do not belong to the model"):
        create_stablelora_optimizer(model, shrink_ratio=0.001, params=groups)


def test_error_trainable_parameter_left_out_of_groups():
    model = tiny_peft_model()
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
    with pytest.raises(ValueError, match="in no parameter group"):
        create_stablelora_optimizer(model, shrink_ratio=0.001, params=params)


def test_error_bf16_adapter_and_warning_fp16():
    model = tiny_peft_model(embedding=False).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16.*rounds back to A.*autocast_adapter_dtype"):
        create_stablelora_optimizer(model, shrink_ratio=0.001)
    model = tiny_peft_model(embedding=False).to(torch.float16)
    with pytest.warns(UserWarning, match="float16"):
        create_stablelora_optimizer(model, shrink_ratio=0.001)


def test_error_closure_required_optimizer_and_non_optimizer():
    with pytest.raises(ValueError, match="LBFGS needs a closure"):
        create_stablelora_optimizer(tiny_peft_model(), torch.optim.LBFGS, shrink_ratio=0.001)
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        create_stablelora_optimizer(tiny_peft_model(), dict, shrink_ratio=0.001)


def test_follows_accelerate_fsdp2_parameter_swap():
    """Trainer + Accelerate FSDP2 build the optimizer, then swap every parameter for a new tensor. The shrink must
    act on the parameters the optimizer steps, and state_dict must still work."""
    built_on, trained, ref_model = tiny_peft_model(), tiny_peft_model(), tiny_peft_model()
    opt = create_stablelora_optimizer(built_on, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    swap_like_accelerate_fsdp2(opt, built_on, trained)
    ref = adamw_reference(ref_model)
    train_both(trained, opt, ref_model, ref, 60)
    assert_same_params(trained, ref_model)
    assert [s.stop_step for s in opt.stable_lora_status()] == list(ref.stop_step.values())
    assert any(s is not None for s in ref.stop_step.values())
    resumed = copy.deepcopy(trained)
    again = create_stablelora_optimizer(resumed, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    again.load_state_dict(opt.state_dict())
    assert again.stable_lora_status() == opt.stable_lora_status()


def test_a_factor_gone_from_param_groups_is_an_error_naming_it():
    model = tiny_peft_model(embedding=False)
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    train_step(model, opt, batches(1)[0])
    opt.param_groups[0]["params"] = opt.param_groups[0]["params"][:2]
    with pytest.raises(RuntimeError, match=r"mid\[default\].lora_A is no longer at its place.*build the optimizer after"):
        train_step(model, opt, batches(1)[0])


def _scaled_step(model, opt, scaler, batch, poison: bool) -> None:
    ids, target = batch
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(ids), target)).backward()
    if poison:  # an fp16 overflow: one inf in one gradient
        next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_the_grad_scaler_skips_neither_shrinks_nor_counts(fused):
    """Fused optimizers get found_inf and skip on the device; non-fused ones are not called. Either way the step
    did not happen: A unchanged, no step counted, and afterwards the run equals one that never saw that batch."""
    model, ref_model = tiny_peft_model(), tiny_peft_model()
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, fused=fused, **ADAMW)
    ref = create_stablelora_optimizer(ref_model, torch.optim.AdamW, shrink_ratio=LAMBDA, fused=fused, **ADAMW)
    # the skipped step halves the scale (backoff 0.5), so the reference starts at the halved scale
    scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=1.0), torch.amp.GradScaler("cpu", init_scale=0.5)
    data = batches(8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _scaled_step(model, opt, scaler, data[0], poison=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(s.shrink_steps == 0 and s.shrinking for s in opt.stable_lora_status())
    for batch in data[1:]:
        _scaled_step(model, opt, scaler, batch, poison=False)
        _scaled_step(ref_model, ref, ref_scaler, batch, poison=False)
    assert_same_params(model, ref_model)
    assert opt.stable_lora_status() == ref.stable_lora_status()
    assert all(s.shrink_steps == 7 for s in opt.stable_lora_status() if s.shrinking)


def test_a_layer_without_gradient_is_left_alone_like_the_base_optimizer_leaves_it():
    """An unrouted MoE expert or idle adapter gets no gradient: AdamW skips it, and so does the shrink."""
    model = tiny_peft_model(embedding=False)
    opt = create_stablelora_optimizer(model, torch.optim.AdamW, shrink_ratio=LAMBDA, **ADAMW)
    idle = find_lora_pairs(model)[1]
    idle_before = (idle.lora_A.detach().clone(), idle.lora_B.detach().clone())
    for ids, target in batches(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(ids), target).backward()
        idle.lora_A.grad = idle.lora_B.grad = None
        opt.step()
    assert torch.equal(idle.lora_A, idle_before[0]) and torch.equal(idle.lora_B, idle_before[1])
    status = {s.name: s for s in opt.stable_lora_status()}
    assert status[idle.name].shrink_steps == 0 and status[idle.name].shrinking
    assert all(s.shrink_steps == 5 for n, s in status.items() if n != idle.name)
