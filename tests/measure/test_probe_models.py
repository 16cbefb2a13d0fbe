"""The probe on models no one here wrote: Hugging Face transformers built from tiny configs (random weights),
checked against the models' own losses and torch.nn.functional; and the probe's inputs and modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steadygrad.measure import probe
from steadygrad.measure.probe import INTEGER_INPUTS_NOTE

transformers = pytest.importorskip("transformers")

VOCAB = 64


@pytest.fixture(scope="module")
def gpt2():
    """A two-layer GPT-2 with its default dropout (0.1 everywhere), so determinism has something to beat."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB
    )
    return transformers.BertForSequenceClassification(config)


def _ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _eval_output(model, **batch):
    """The model's own forward in eval mode without gradients: the reference a probe must reproduce."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**batch)
    finally:
        model.train(was)


# ---- which loss -----------------------------------------------------------------------------------------


def test_gpt2_with_labels_reports_its_own_loss(gpt2):
    ids = _ids(2, 8)
    report = probe(gpt2, {"input_ids": ids, "labels": ids})
    expected = float(_eval_output(gpt2, input_ids=ids, labels=ids).loss)  # HF's shifted causal-LM loss
    assert report.loss == pytest.approx(expected, rel=1e-6)
    assert report.loss_name == "the model's own loss (output.loss)"
    assert INTEGER_INPUTS_NOTE in report.notes and math.isnan(report.input_grad_norm)


def test_sequence_logits_against_targets_are_plain_per_position_cross_entropy(gpt2):
    ids, targets = _ids(2, 8), _ids(2, 8, seed=2)
    targets[0, :3] = -100  # left out, as Hugging Face leaves out its padding
    report = probe(gpt2, {"input_ids": ids}, targets=targets)
    logits = _eval_output(gpt2, input_ids=ids).logits
    kept = targets != -100
    assert report.loss == pytest.approx(float(F.cross_entropy(logits[kept], targets[kept])), rel=1e-6)
    assert report.loss_name.startswith("cross-entropy (N, T, C)")


def test_targets_that_do_not_fit_the_logits_name_the_remedy(gpt2):
    with pytest.raises(ValueError, match=r"\(2, 8, 64\).*\(2, 9\).*loss="):
        probe(gpt2, {"input_ids": _ids(2, 8)}, targets=_ids(2, 9))


def test_without_labels_or_targets_the_projection_is_named_and_a_given_loss_wins(gpt2):
    ids = _ids(2, 8)
    assert probe(gpt2, {"input_ids": ids}).loss_name == "random projection of the outputs (seed 0)"

    def mean_logit(output, targets):
        return output.logits.mean()

    report = probe(gpt2, {"input_ids": ids, "labels": ids}, targets=ids, loss=mean_logit)
    assert report.loss_name.endswith("mean_logit")
    assert report.loss == pytest.approx(float(_eval_output(gpt2, input_ids=ids).logits.mean()), rel=1e-5)


def test_bert_takes_a_batch_encoding(bert):
    batch = transformers.BatchEncoding(
        {
            "input_ids": _ids(3, 6),
            "attention_mask": torch.ones(3, 6, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1]),
        }
    )
    report = probe(bert, batch)
    assert report.loss == pytest.approx(float(_eval_output(bert, **batch).loss), rel=1e-6)
    assert report.loss_name == "the model's own loss (output.loss)" and report.records
    assert INTEGER_INPUTS_NOTE in report.notes


# ---- modes and determinism ------------------------------------------------------------------------------


def test_probes_of_a_model_with_dropout_agree(gpt2):
    ids = _ids(2, 8)
    gpt2.train()
    first, second = (probe(gpt2, {"input_ids": ids, "labels": ids}).to_dict() for _ in range(2))
    assert first == second
    # as it is, dropout runs, from the probe's seeded random state: still the same twice, and not the eval loss
    as_is = [probe(gpt2, {"input_ids": ids, "labels": ids}, mode=None).loss for _ in range(2)]
    assert as_is[0] == as_is[1] != pytest.approx(first["loss"], rel=1e-6)


class FunctionalDropout(nn.Module):
    """Dropout no module flag can switch off: only the seed makes it repeatable."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.linear(x), 0.5, training=True)


def test_functional_dropout_is_seeded_and_the_global_state_untouched():
    model, x = FunctionalDropout(), torch.randn(4, 8)

    def total(output):
        return output.sum()

    losses = []
    for seed in (0, 0, 1):
        torch.rand(8)  # the global state moves on between probes: the pass's does not
        rng = torch.get_rng_state()
        losses.append(probe(model, x, loss=total, seed=seed).loss)
        assert torch.equal(rng, torch.get_rng_state())
    assert losses[0] == losses[1] != losses[2]


class Flags(nn.Module):
    """Records each module's training flag as the forward sees it."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)
        self.seen: dict[str, bool] = {}

    def forward(self, x):
        self.seen = {name: m.training for name, m in self.named_modules()}
        return self.b(self.drop(self.a(x)))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("train", {"": True, "a": True, "drop": False, "b": True}),
        ("eval", {"": False, "a": False, "drop": False, "b": False}),
        (None, {"": True, "a": False, "drop": True, "b": True}),  # the mixed flags set below
    ],
)
def test_the_mode_is_taken_and_every_flag_restored(mode, expected):
    model = Flags()
    model.train()
    model.a.eval()  # a mix no root-level train()/eval() could restore
    before = {name: m.training for name, m in model.named_modules()}
    probe(model, torch.randn(3, 4), mode=mode)
    assert model.seen == expected
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.drop.p == 0.5


def test_a_bad_mode_names_the_accepted_ones():
    model = Flags()
    with pytest.raises(ValueError, match=r"'train', 'eval', None; got 'training'"):
        probe(model, torch.randn(3, 4), mode="training")
    assert model.training and not model.seen  # nothing ran


# ---- inputs of any structure ----------------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(3, 2), nn.Linear(5, 2)

    def forward(self, x1, x2, scale=1.0):
        return (self.left(x1) + self.right(x2)) * scale


@pytest.mark.parametrize("wrap", [tuple, list, lambda xs: {"x1": xs[0], "x2": xs[1]}], ids=["tuple", "list", "dict"])
def test_positional_and_keyword_inputs(wrap):
    xs = [torch.randn(4, 3), torch.randn(4, 5)]
    report = probe(TwoInputs(), wrap(xs))
    assert [r.name for r in report.records] == ["left", "right"]
    assert math.isfinite(report.input_grad_norm) and INTEGER_INPUTS_NOTE not in report.notes
