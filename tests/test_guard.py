"""Never silently plain: DeepSpeed settings refused with their fix, TrainingArguments carried over by
``use_stable_lora``, and the guard that stops a run in which Stable-LoRA does not train."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from stablelora import create_stablelora_optimizer
from stablelora.optim.factory import create_from_training_args
from stablelora.optim.zero import check_zero_config
from stablelora.train.config import ConfigError, load_config
from stablelora.train.data import CausalCollator, ListDataset
from stablelora.train.guard import StableLoRAGuard, use_stable_lora
from stablelora.train.trainer import unwrap_optimizer
from tiny import tiny_llama_peft, token_items


def _args(tmp_path, **kwargs):
    return TrainingArguments(**{**dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                       learning_rate=1e-2, use_cpu=True, report_to="none", disable_tqdm=True,
                                       save_strategy="no", remove_unused_columns=False), **kwargs})


def _trainer(tmp_path, **kwargs):
    return Trainer(model=kwargs.pop("model", None) or tiny_llama_peft(), args=_args(tmp_path, **kwargs.pop("args", {})),
                   train_dataset=ListDataset(token_items(16)), data_collator=CausalCollator(0), **kwargs)


def test_zero_settings_that_replace_the_optimizer_are_refused_with_their_fix():
    zero2 = {"zero_optimization": {"stage": 2}}
    check_zero_config(zero2)
    check_zero_config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                       "zero_force_ds_cpu_optimizer": False})  # our optimizer then steps the CPU partitions
    with pytest.raises(ValueError, match='"optimizer" block.*Remove'):
        check_zero_config({**zero2, "optimizer": {"type": "AdamW"}})
    with pytest.raises(ValueError, match='DeepSpeedCPUAdam.*"zero_force_ds_cpu_optimizer": false'):
        check_zero_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ValueError, match='"round_robin_gradients": false'):
        check_zero_config({"zero_optimization": {"stage": 2, "round_robin_gradients": True}})


@pytest.mark.parametrize("deepspeed, match", [
    ({"zero_optimization": {"stage": 3}}, "stage 3: `stablelora train` evaluates"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, 'training.deepspeed: .*"optimizer" block'),
    ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "round_robin_gradients"),
])
def test_stablelora_train_refuses_deepspeed_settings_at_load(deepspeed, match):
    import json

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        with pytest.raises(ConfigError, match=match):
            load_config("configs/minilm_privacyqa.yaml", ["method.optimizer=stable-lora",
                                                          f"training.deepspeed={json.dumps(deepspeed)}"])
        with pytest.raises(ConfigError, match="method.optimizer=lora-rite with training.deepspeed"):
            load_config("configs/minilm_privacyqa.yaml", ["method.optimizer=lora-rite",
                                                          'training.deepspeed={"zero_optimization": {"stage": 2}}'])
    finally:
        unset_hf_deepspeed_config()  # transformers keeps the last DeepSpeed config process-wide


def test_create_from_training_args_takes_weight_decay_once_from_optim_args(tmp_path):
    """optim="sgd" with optim_args naming weight_decay crashed ("multiple values for keyword argument")."""
    model = tiny_llama_peft()
    args = _args(tmp_path, optim="sgd", optim_args="weight_decay=0.1,momentum=0.9", weight_decay=0.0)
    optimizer = create_from_training_args(model, args, shrink_ratio=0.1)
    assert type(optimizer).__name__ == "StableLoRASGD"
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[0]["momentum"] == 0.9


def test_optimizers_that_rewrite_the_parameters_are_refused(tmp_path):
    args = _args(tmp_path, optim="galore_adamw", optim_target_modules=["q_proj"])
    with pytest.raises(ValueError, match="optim='galore_adamw' builds its own parameter groups"):
        create_from_training_args(tiny_llama_peft(), args)


def test_use_stable_lora_keeps_the_trainers_optimizer_settings(tmp_path):
    args = {"weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6,
            "optim": "adamw_torch", "learning_rate": 3e-2}
    trainer = use_stable_lora(_trainer(tmp_path, args=args), shrink_ratio=0.1)
    assert any(isinstance(c, StableLoRAGuard) for c in trainer.callback_handler.callbacks)
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert type(optimizer).__name__ == "StableLoRAAdamW"
    decayed = next(g for g in optimizer.param_groups if g["weight_decay"])
    assert decayed["weight_decay"] == 0.1 and decayed["betas"] == (0.8, 0.95) and decayed["eps"] == 1e-6
    assert decayed["initial_lr"] == 3e-2
    assert all(s.shrink_steps == 3 for s in optimizer.stable_lora_status())  # the shrink ran on every step


def test_use_stable_lora_refuses_to_replace_an_optimizer_choice(tmp_path):
    model = tiny_llama_peft()
    prebuilt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="pre-built optimizer"):
        use_stable_lora(_trainer(tmp_path, model=model, optimizers=(prebuilt, None)))
    with pytest.raises(ValueError, match="already has optimizer_cls_and_kwargs.*'SGD'"):
        use_stable_lora(_trainer(tmp_path, optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1e-2})))


def test_the_guard_stops_a_run_whose_optimizer_is_not_stable_lora(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[StableLoRAGuard()])  # Trainer's own AdamW
    with pytest.raises(RuntimeError, match="the optimizer this Trainer steps is AcceleratedOptimizer -> AdamW"):
        trainer.train()


class _Skipped:
    """An Accelerate wrapper whose step a GradScaler skipped."""

    def __init__(self, optimizer, skipped):
        self.optimizer, self.step_was_skipped = optimizer, skipped


def test_the_guard_stops_a_run_in_which_the_shrink_never_ran():
    model = tiny_llama_peft()
    optimizer = create_stablelora_optimizer(model, shrink_ratio=0.1, lr=1e-2)
    guard = StableLoRAGuard()
    guard.on_train_begin(None, None, None, optimizer=_Skipped(optimizer, False))
    guard.on_step_end(None, None, None, optimizer=_Skipped(optimizer, True))  # an overflow step: wait
    with pytest.raises(RuntimeError, match="its shrink did not run in the first optimizer step"):
        guard.on_step_end(None, None, None, optimizer=_Skipped(optimizer, False))  # stepped around it


def test_use_stable_lora_refuses_unsloths_embedding_learning_rate(tmp_path):
    """UnslothTrainer builds its own optimizer whenever its arguments' embedding_learning_rate is set (unsloth needs
    a GPU to import, so its arguments class is mirrored: a TrainingArguments with that one field)."""
    from dataclasses import dataclass

    @dataclass
    class UnslothLikeArguments(TrainingArguments):
        embedding_learning_rate: float | None = None

    args = UnslothLikeArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                embedding_learning_rate=5e-6)
    trainer = Trainer(model=tiny_llama_peft(), args=args, train_dataset=ListDataset(token_items(4)),
                      data_collator=CausalCollator(0))
    with pytest.raises(ValueError, match="embedding_learning_rate is set, and with it unsloth's UnslothTrainer"):
        use_stable_lora(trainer)
