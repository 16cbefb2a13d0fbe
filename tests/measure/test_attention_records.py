"""Attention entropy and the largest logit in the probe's and the Monitor's records, against the attention
probabilities each library returns itself."""

import math

import pytest
import torch
from torch import nn

from steadygrad.attention import attention_entropy
from steadygrad.measure import Monitor, probe
from steadygrad.nets import NetSpec, build


def _entropy_per_head(probs: torch.Tensor) -> torch.Tensor:
    p = probs.double()
    return torch.distributions.Categorical(probs=p.clamp_min(0)).entropy().mean(dim=(0, 2))


def test_built_transformer_records_match_its_own_probabilities_and_logits():
    spec = NetSpec(kind="transformer", depth=2, width=32, heads=4, seq_len=10, vocab=20)
    net = build(spec, torch.Generator().manual_seed(0))
    tokens, targets = spec.example_batch(6, torch.Generator().manual_seed(1))
    seen = []
    handle = net.block02.attn.softmax.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    report = probe(net, tokens, targets)
    handle.remove()
    logits, probs = seen[0]
    record = next(r for r in report.records if r.name == "block02")
    heads = _entropy_per_head(probs)
    assert record.attn_entropy == pytest.approx(float(heads.mean()), rel=1e-6)
    assert record.attn_entropy_min == pytest.approx(float(heads.min()), rel=1e-6)
    assert record.attn_max_logit == pytest.approx(float(logits[torch.isfinite(logits)].max()), rel=1e-6)
    assert math.isnan(next(r for r in report.records if r.name == "head").attn_entropy)
    assert "Attention entropy over 2 attention layer(s)" in report.summary()
    assert "attn H" in [c.header for c in report.table().columns]


class _MHAModel(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.need_weights = need_weights
        self.returned = None

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights)
        self.returned = weights
        return self.head(out)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_is_measured_and_returns_what_the_caller_asked_for(need_weights):
    torch.manual_seed(0)
    model = _MHAModel(need_weights)
    x = torch.randn(4, 7, 16)
    _, per_head = model.attn(x, x, x, need_weights=True, average_attn_weights=False)
    report = probe(model, x)
    record = next(r for r in report.records if r.name == "attn")
    heads = _entropy_per_head(per_head.detach())
    assert record.attn_entropy == pytest.approx(float(heads.mean()), rel=1e-5)
    assert record.attn_entropy_min == pytest.approx(float(heads.min()), rel=1e-5)
    assert math.isnan(record.attn_max_logit)  # torch never returns the logits
    if need_weights:
        torch.testing.assert_close(model.returned, per_head.mean(1))  # averaged, as the caller's default asks
    else:
        assert model.returned is None
    model(x)  # unmonitored: untouched
    assert (model.returned is None) is (not need_weights)


def test_monitor_records_attention_on_logged_steps_only():
    spec = NetSpec(kind="transformer", depth=2, width=32, heads=2, seq_len=8, vocab=16)
    net = build(spec, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    tokens, targets = spec.example_batch(4, torch.Generator().manual_seed(1))
    with Monitor(net, optimizer=optimizer, every=2) as monitor:
        for _ in range(4):
            loss = nn.functional.cross_entropy(net(tokens).flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    reports = monitor.history.reports
    assert [r.step for r in reports] == [1, 3]
    for report in reports:
        assert all(math.isfinite(r.attn_entropy) for r in report.records if r.name.startswith("block"))


def _gpt2(attn_implementation: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=50, attn_implementation=attn_implementation
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_hf_eager_attention_entropy_equals_the_models_own_attentions():
    model = _gpt2("eager")
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    model.eval()  # the probe's train mode turns dropout off, so eval attentions are the ones it sees
    with torch.no_grad():
        own = model(tokens, output_attentions=True).attentions
    report = probe(model, {"input_ids": tokens, "labels": tokens})
    for layer, probs in enumerate(own):
        heads = _entropy_per_head(probs)
        record = next(r for r in report.records if r.name == f"transformer.h.{layer}.attn.c_proj")
        assert record.attn_entropy == pytest.approx(float(heads.mean()), rel=1e-5)
        assert record.attn_entropy_min == pytest.approx(float(heads.min()), rel=1e-5)
    assert not any("not measured" in note for note in report.notes)


def test_hf_sdpa_attention_is_said_to_be_not_measured():
    model = _gpt2("sdpa")
    tokens = torch.randint(0, 50, (2, 8))
    report = probe(model, {"input_ids": tokens, "labels": tokens})
    assert all(math.isnan(r.attn_entropy) for r in report.records)
    note = next(n for n in report.notes if "attention probabilities not measured" in n)
    assert "transformer.h.0.attn" in note and "attn_implementation='eager'" in note


def test_entropy_of_the_uniform_causal_rows():
    probs = torch.tril(torch.ones(5, 5))
    probs = probs / probs.sum(-1, keepdim=True)
    expected = torch.log(torch.arange(1, 6, dtype=torch.float64))
    torch.testing.assert_close(attention_entropy(probs.double()), expected)


def test_t5s_position_bias_is_not_read_as_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.randint(0, 64, (2, 12))
    report = probe(model, {"input_ids": ids, "decoder_input_ids": ids[:, :8]})
    # T5's attention returns (output, position_bias): no probabilities, so no value, and the note says so
    assert all(math.isnan(r.attn_entropy) for r in report.records)
    note = next(n for n in report.notes if "attention probabilities not measured" in n)
    assert "EncDecAttention" in note


def test_multihead_attention_called_with_positional_need_weights_is_left_as_called_and_not_measured():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head, self.returned = attn, nn.Linear(16, 3), None

        def forward(self, x):
            out, self.returned = self.attn(x, x, x, None, True)  # need_weights positional: averaged (N, T, S)
            return self.head(out)

    model = Model()
    x = torch.randn(4, 7, 16)
    report = probe(model, x)
    assert all(math.isnan(r.attn_entropy) for r in report.records)
    assert model.returned.shape == (4, 7, 7)
    assert any("attention probabilities not measured" in n and "attn" in n for n in report.notes)
