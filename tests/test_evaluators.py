"""Evaluators on hand-made cases whose answers can be computed by hand."""

import math

import pytest
import torch

from stablelora.eval.math import extract_final_number, same_number
from stablelora.eval.multiple_choice import evaluate_causal_mc, option_logprobs


class BigramLM(torch.nn.Module):
    """logits at position t = table[token t]: every log-probability is known in closed form."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.log(torch.tensor(table)), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})


class CharTokenizer:
    """Tokens: 'q'=0, 'a'=1, 'b'=2, 'c'=3 (spaces ignored)."""

    pad_token_id = 0
    vocab = {"q": 0, "a": 1, "b": 2, "c": 3}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[c] for c in text if c in self.vocab]}


# next-token probabilities: after q, 'a' is likely; after 'b', 'b' is almost certain
TABLE = [[0.1, 0.5, 0.3, 0.1],   # after q
         [0.25, 0.25, 0.25, 0.25],  # after a
         [0.01, 0.01, 0.97, 0.01],  # after b
         [0.25, 0.25, 0.25, 0.25]]  # after c


def test_option_logprobs_match_hand_computation():
    scores = option_logprobs(BigramLM(TABLE), CharTokenizer(), [([0], [1]), ([0], [2, 2, 2])], batch_size=2)
    assert scores[0][0] == pytest.approx(math.log(0.5)) and scores[0][1] == 1
    assert scores[1][0] == pytest.approx(math.log(0.3) + 2 * math.log(0.97)) and scores[1][1] == 3


def test_length_normalisation_changes_the_choice(monkeypatch):
    import stablelora.eval.multiple_choice as mc

    monkeypatch.setattr(mc, "mc_prompt", lambda ex: "q")
    monkeypatch.setattr(mc, "mc_continuation", lambda choice: choice)
    # sum: 'a' = log .5 = -0.69 beats 'bbb' = -1.26; mean: 'bbb' = -0.42 beats 'a'
    examples = [{"question": "q", "choices": ["a", "bbb"], "label": 1}]
    result = evaluate_causal_mc(BigramLM(TABLE), CharTokenizer(), examples, max_length=16, batch_size=4)
    assert result["accuracy"] == 1.0 and result["accuracy_unnormalised"] == 0.0 and result["chance"] == 0.5


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,250", "1250"),
    ("The answer is 12.5 dollars.", "12.5"),
    ("first 3 then 40.", "40"),
    ("#### -8", "-8"),
    ("no number here", None),
    ("#### 14.0", "14"),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_same_number():
    assert same_number("14", "14.0") and not same_number(None, "3") and not same_number("3", "4")


class DeviceRecorder(torch.nn.Module):
    """A model on another device (meta stands in for a GPU on a CPU machine): records where its inputs are."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.input_devices = []

    def forward(self, input_ids, attention_mask=None):
        self.input_devices += [input_ids.device, attention_mask.device]
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 8)})


def test_answer_token_loss_moves_inputs_to_the_model_device():
    from stablelora.train.data import CausalCollator
    from stablelora.train.evaluate import answer_token_loss

    model = DeviceRecorder()
    items = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}] * 3
    loss = answer_token_loss(model, items, CausalCollator(0), batch_size=2)
    assert loss == pytest.approx(math.log(8))
    assert model.input_devices and all(d.type == "meta" for d in model.input_devices)
