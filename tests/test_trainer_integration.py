"""Trainer integration: optimizer built in create_optimizer, exact resume, adapter round trip, TRL."""

import pytest
import torch
from peft import PeftModel

from stablelora.methods import MethodArguments
from stablelora.train.data import CausalCollator, ListDataset
from stablelora.train.checkpoints import latest_checkpoint
from stablelora.train.model import save_adapter, save_initial_adapter
from stablelora.train.trainer import StableLoRATrainer, unwrap_optimizer
from tiny import tiny_llama, tiny_llama_peft, token_items


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=12, save_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.01, seed=0, use_cpu=True, report_to="none", logging_steps=3,
                remove_unused_columns=False, disable_tqdm=True, save_strategy="steps")
    return TrainingArguments(**{**base, **kw})


def _trainer(out, model, **kw):
    return StableLoRATrainer(model=model, args=_args(out, **kw), train_dataset=ListDataset(token_items(40)),
                             data_collator=CausalCollator(0),
                             method=MethodArguments(optimizer="stable-lora", shrink_ratio=0.2))


def test_resume_through_trainer_is_bit_identical(tmp_path):
    straight_model = tiny_llama_peft()
    straight = _trainer(tmp_path / "a", straight_model)
    straight.train()
    opt = unwrap_optimizer(straight.optimizer)
    stops = [s.stop_step for s in opt.stable_lora_status()]
    assert any(s is not None for s in stops) and any(s is None or s > 1 for s in stops)

    resumed_model = tiny_llama_peft()  # same pretrained base; the adapter must come from the checkpoint:
    with torch.no_grad():
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    resumed = _trainer(tmp_path / "a", resumed_model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    for (name, p), q in zip(straight_model.named_parameters(), resumed_model.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name
    assert unwrap_optimizer(resumed.optimizer).stable_lora_status() == opt.stable_lora_status()
    assert latest_checkpoint(tmp_path / "a").name == "checkpoint-12"


def test_shrink_fraction_is_logged_and_adapter_round_trips(tmp_path):
    model = tiny_llama_peft()
    trainer = _trainer(tmp_path / "b", model, max_steps=6)
    trainer.train()
    assert any("stable_lora/shrinking_fraction" in h for h in trainer.state.log_history)
    target = tmp_path / "adapter"
    save_adapter(model, target, None)
    assert {p.name for p in target.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    loaded = PeftModel.from_pretrained(tiny_llama(), target)
    ids = torch.tensor([token_items(1)[0]["input_ids"]])
    model.eval()
    loaded.eval()
    assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "lora+", "riemannian", "lora-rite", "adamw-wd-a"])
def test_every_method_runs_under_trainer(tmp_path, optimizer):
    model = tiny_llama_peft()
    trainer = StableLoRATrainer(model=model, args=_args(tmp_path, max_steps=3, save_strategy="no"),
                                train_dataset=ListDataset(token_items(12)), data_collator=CausalCollator(0),
                                method=MethodArguments(optimizer=optimizer))
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_trl_sft_trainer_with_the_mixin(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stablelora.assets.models import resolve_model
    from stablelora.train.trainer import StableLoRATrainerMixin

    class StableLoRASFTTrainer(StableLoRATrainerMixin, SFTTrainer):
        pass

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))  # any real tokenizer will do
    tokenizer.eos_token = tokenizer.sep_token  # a BERT vocabulary has no EOS; SFT appends one
    model = tiny_llama_peft(vocab=tokenizer.vocab_size)
    data = Dataset.from_list([{"text": f"example number {i} says hello"} for i in range(16)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, report_to="none", save_strategy="no", max_length=32, disable_tqdm=True)
    trainer = StableLoRASFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                   method=MethodArguments(optimizer="stable-lora", shrink_ratio=0.01))
    trainer.train()
    status = unwrap_optimizer(trainer.optimizer).stable_lora_status()
    assert status and all(s.shrink_steps >= 1 for s in status)


def test_first_interrupt_saves_a_checkpoint_and_stops(tmp_path):
    import signal

    from transformers import TrainerCallback

    from stablelora.train.trainer import GracefulInterrupt

    interrupt = GracefulInterrupt()

    class PressCtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                signal.raise_signal(signal.SIGINT)  # delivered to GracefulInterrupt's handler

    trainer = _trainer(tmp_path, tiny_llama_peft(), max_steps=12, save_steps=100)
    trainer.add_callback(interrupt)
    trainer.add_callback(PressCtrlC())
    trainer.train()
    assert interrupt.requested and trainer.state.global_step == 4
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert signal.getsignal(signal.SIGINT) is not interrupt._handle  # handler restored after training


@pytest.mark.parametrize("adapter", ["pissa", "lora-ga"])
def test_inits_that_change_the_base_save_as_a_plain_adapter_for_the_original_base(tmp_path, adapter):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import preprocess_loraga

    from stablelora.methods import lora_config_kwargs

    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        **lora_config_kwargs(MethodArguments(adapter=[adapter])))
    batch = CausalCollator(0)(token_items(4))
    if adapter == "lora-ga":
        preprocess_loraga(base, config, lambda: base(**batch).loss.backward())
    model = get_peft_model(base, config)
    init_dir = tmp_path / "init"
    save_initial_adapter(model, init_dir)
    trainer = StableLoRATrainer(model=model, args=_args(tmp_path / "ckpt", max_steps=3, save_strategy="no"),
                                train_dataset=ListDataset(token_items(12)), data_collator=CausalCollator(0),
                                method=MethodArguments(optimizer="adamw"))
    trainer.train()
    save_adapter(model, tmp_path / "adapter", init_dir)

    fresh = tiny_llama()
    fresh.load_state_dict(original)  # the unmodified pretrained weights
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    model.eval()
    loaded.eval()
    ids = torch.tensor([token_items(1, seed=5)[0]["input_ids"]])
    assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4)


def test_factory_in_plain_trainer_as_the_readme_shows(tmp_path):
    from transformers import Trainer

    from stablelora import StableLoRAOptimizerFactory

    model = tiny_llama_peft()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=12, save_strategy="no"),
                      train_dataset=ListDataset(token_items(40)), data_collator=CausalCollator(0),
                      optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory,
                                                {"optimizer_cls": torch.optim.AdamW, "lr": 1e-2, "weight_decay": 0.01,
                                                 "shrink_ratio": 0.2, "fused": True}))
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01]  # LoRA weights only: all decayed
    stops = [s.stop_step for s in optimizer.stable_lora_status()]
    assert all(s is not None for s in stops), stops
    # the same run through the library's own Trainer subclass (Trainer's default: fused AdamW) gives the same adapter
    reference_model = tiny_llama_peft()
    _trainer(tmp_path / "ref", reference_model, max_steps=12, save_strategy="no").train()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name


def test_factory_keeps_trainer_weight_decay_rule_and_needs_lr():
    from stablelora import StableLoRAOptimizerFactory

    model = tiny_llama_peft()
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a norm weight: Trainer never decays it
    optimizer = StableLoRAOptimizerFactory()(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p for p in plain["params"]] == [model.base_model.model.model.norm.weight]
    with pytest.raises(TypeError, match="needs lr in its kwargs"):
        StableLoRAOptimizerFactory()(model, weight_decay=0.1)


def test_factory_takes_a_torch_optimizer_by_name_as_yaml_configs_give_it():
    """LLaMA-Factory's optim_config and Trainer YAML configs name the base optimizer; a wrong name is a message that
    lists the right ones, not an AttributeError from inside torch.optim."""
    from stablelora import StableLoRAOptimizerFactory

    model = tiny_llama_peft()
    for name in ("SGD", "torch.optim.SGD"):
        assert isinstance(StableLoRAOptimizerFactory()(model, lr=1e-3, optimizer_cls=name), torch.optim.SGD)
    for wrong in ("Adamw", "Optimizer", "lr_scheduler"):
        with pytest.raises(ValueError, match=f"optimizer_cls '{wrong}' is not a torch.optim optimizer. Name one of "
                                             r"\[.*'AdamW'.*\] \(case matters\)"):
            StableLoRAOptimizerFactory()(model, lr=1e-3, optimizer_cls=wrong)


def test_factory_in_trl_sft_trainer_with_peft_config(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stablelora import StableLoRAOptimizerFactory
    from stablelora.assets.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))  # any real tokenizer will do
    tokenizer.eos_token = tokenizer.sep_token  # a BERT vocabulary has no EOS; SFT appends one
    data = Dataset.from_list([{"text": f"example number {i} says hello"} for i in range(16)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                     report_to="none", save_strategy="no", max_length=32, disable_tqdm=True, bf16=False)
    trainer = SFTTrainer(model=tiny_llama(vocab=tokenizer.vocab_size), args=args, train_dataset=data,
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"),
                         optimizer_cls_and_kwargs=(StableLoRAOptimizerFactory, {"lr": 1e-2, "shrink_ratio": 0.01}))
    trainer.train()
    status = unwrap_optimizer(trainer.optimizer).stable_lora_status()
    assert len(status) == 4 and all(s.shrink_steps >= 1 for s in status)


def test_a_run_whose_weights_turn_nan_stops_and_keeps_only_finite_checkpoints(tmp_path):
    from transformers import TrainerCallback

    from stablelora.train.trainer import DivergenceGuard, TrainingDiverged

    class PoisonAtStep5(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:  # during step 5
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    model = tiny_llama_peft()
    trainer = _trainer(tmp_path, model, max_steps=12, save_steps=2, logging_steps=100)
    trainer.add_callback(DivergenceGuard(model))
    trainer.add_callback(PoisonAtStep5())
    with pytest.raises(TrainingDiverged, match=r"diverged by step 6: .*lora_A.*learning_rate=0.01.*after step 4"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_written_files_follow_the_umask(tmp_path):
    import os

    from stablelora.fileio import write_json

    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        save_adapter(tiny_llama_peft(), tmp_path / "adapter", None)
    finally:
        os.umask(previous)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


def test_a_failed_directory_write_leaves_the_old_directory_and_no_debris(tmp_path):
    from stablelora.fileio import atomic_directory

    save_adapter(tiny_llama_peft(), tmp_path / "adapter", None)
    before = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "adapter") as tmp:
            (tmp / "adapter_config.json").write_text("{half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    save_adapter(tiny_llama_peft(), tmp_path / "adapter", None)  # and a second save replaces the first whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
