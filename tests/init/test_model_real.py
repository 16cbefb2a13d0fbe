"""init_model on models no one here wrote: GPT-2 (HF Conv1D, tied embeddings) and BERT, built from config,
and unregistered modules owning a weight matrix. References: the variance each scheme predicts from the
true fans, computed here by hand from the weight shapes."""

import math
import subprocess
import sys

import pytest
import torch
from scipy import stats
from torch import nn

from steadygrad import kinds
from steadygrad.init import he_normal_, init_model
from tests import zoo


def tiny_gpt2():
    pytest.importorskip("transformers")
    return zoo.gpt2()[0]  # the zoo's: 2 layers, n_embd 32, vocab 64


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


def conv1d_layers(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def test_hf_conv1d_is_a_transposed_dense_layer():
    gpt2 = tiny_gpt2()
    _, layer = conv1d_layers(gpt2)[0]
    assert kinds.weight_family(layer) == "dense"
    assert kinds.weight_transposed(layer)
    assert not kinds.weight_transposed(nn.Linear(2, 3))


def test_steadygrad_does_not_import_transformers():
    code = "import sys, steadygrad, steadygrad.init, steadygrad.kinds; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("scheme", "variance"),
    [
        ("he_normal", lambda fan_in, fan_out: 2 / fan_in),  # nonlinearity relu: gain^2 = 2
        ("glorot_uniform", lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
    ],
)
def test_gpt2_conv1d_weights_get_the_variance_of_their_true_fans(scheme, variance, generator):
    gpt2 = tiny_gpt2()
    records = init_model(gpt2, scheme, nonlinearity="relu", generator=generator)
    by_name = {(r.layer, r.param): r for r in records}
    layers = conv1d_layers(gpt2)
    assert len(layers) == 8
    for name, layer in layers:
        fan_in, fan_out = layer.weight.shape  # Conv1D: (in_features, out_features)
        assert (by_name[name, "weight"].fan_in, by_name[name, "weight"].fan_out) == (fan_in, fan_out)
        assert float(layer.weight.detach().var()) == pytest.approx(variance(fan_in, fan_out), rel=0.1), name
        assert torch.all(layer.bias == 0)
    # the non-square ones tell the two readings apart: 2 / shape[1] would be 4x off for c_fc
    c_fc = gpt2.transformer.h[0].mlp.c_fc.weight.detach()
    if scheme == "he_normal":
        assert float(c_fc.var()) > 3 * 2 / c_fc.shape[1]


def test_gpt2_tied_embedding_is_initialized_once_by_the_embedding_rule(generator):
    gpt2 = tiny_gpt2()
    shapes = []

    def spy(tensor, nonlinearity="relu", generator=None):
        shapes.append(tuple(tensor.shape))
        return he_normal_(tensor, nonlinearity=nonlinearity, generator=generator)

    records = init_model(gpt2, spy, generator=generator)
    wte = gpt2.transformer.wte.weight
    assert gpt2.lm_head.weight is wte  # the tie holds
    assert (64, 32) not in shapes  # lm_head's (vocab, n_embd) matrix was never drawn by the scheme
    assert [(r.layer, r.rule) for r in records if r.param == "weight" and r.layer.endswith(("wte", "lm_head"))] == [
        ("transformer.wte", "embedding")
    ]
    # N(0, 1), the embedding rule; lm_head's Linear rule would give std sqrt(2 / 32) = 0.25
    assert float(wte.detach().std()) == pytest.approx(1.0, rel=0.05)
    assert abs(float(wte.detach().mean())) < 0.1
    tied = [s for s in records.skipped if s.layer == "lm_head"]
    assert [(s.param, s.reason) for s in tied] == [("weight", "tied to transformer.wte.weight, initialized there once")]


def test_embedding_std_and_padding_row(generator):
    net = nn.ModuleDict({"emb": nn.Embedding(500, 40, padding_idx=3), "bag": nn.EmbeddingBag(500, 40)})
    records = init_model(net, "lecun_normal", embedding=0.02, generator=generator)
    assert torch.all(net["emb"].weight[3] == 0)
    assert float(net["emb"].weight[4:].detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(net["bag"].weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert {r.rule for r in records} == {"embedding"}
    before = net["emb"].weight.clone()
    again = init_model(net, "lecun_normal", embedding=None)
    assert torch.equal(net["emb"].weight, before)
    assert {s.reason for s in again.skipped} == {"embedding=None: embeddings left as they are"}


def test_bert_from_config(generator):
    bert = tiny_bert()
    with torch.no_grad():
        for m in bert.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(3.0)
    records = init_model(bert, "glorot_normal", generator=generator)
    linears = [m for m in bert.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 13
    # each weight divided by the std Glorot predicts from its fans: pooled, these are N(0, 1) draws (KS test);
    # one 32x32 matrix alone holds only 1024 draws, so per layer the variance is only checked within 25%
    z = []
    for layer in linears:
        out_f, in_f = layer.weight.shape
        assert float(layer.weight.detach().var()) == pytest.approx(2 / (in_f + out_f), rel=0.25)
        z.append(layer.weight.detach().flatten() / math.sqrt(2 / (in_f + out_f)))
    assert stats.kstest(torch.cat(z).double().numpy(), "norm").pvalue > 1e-3
    embeddings = [bert.embeddings.word_embeddings, bert.embeddings.position_embeddings]
    for emb in embeddings:
        assert float(emb.weight.detach().std()) == pytest.approx(1.0, rel=0.1)
    assert all(torch.all(m.weight == 3.0) for m in bert.modules() if isinstance(m, nn.LayerNorm))
    norms = [s for s in records.skipped if s.kind == "LayerNorm"]
    assert len(norms) == 2 * 5 and {s.reason for s in norms} == {"a normalization's parameter: left as it is"}
    initialized = {(r.layer, r.param) for r in records}
    assert len(initialized) == len(records)  # each parameter once
    assert len(records) + len(records.skipped) == len(list(bert.parameters()))


class Custom(nn.Module):
    """A layer steadygrad does not know: a weight of 3 dims, a bias, a positional table and a scale."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((50, 20, 5), 7.0))
        self.bias = nn.Parameter(torch.full((50,), 7.0))
        self.pos_embedding = nn.Parameter(torch.full((1, 10, 50), 7.0))
        self.scale = nn.Parameter(torch.full((50,), 7.0))


def test_unregistered_weights_are_treated_as_dense(generator):
    net = nn.ModuleDict({"custom": Custom(), "bilinear": nn.Bilinear(30, 40, 20), "mha": nn.MultiheadAttention(64, 4)})
    records = init_model(net, "lecun_normal", generator=generator)
    custom = net["custom"]
    assert float(custom.weight.detach().var()) == pytest.approx(1 / 100, rel=0.1)  # fan_in = 20 x 5
    assert torch.all(custom.bias == 0)
    assert torch.all(custom.pos_embedding == 7.0) and torch.all(custom.scale == 7.0)
    assert float(net["bilinear"].weight.detach().var()) == pytest.approx(1 / (30 * 40), rel=0.1)
    assert float(net["mha"].in_proj_weight.detach().var()) == pytest.approx(1 / 64, rel=0.1)  # (3 x 64, 64): fan_in 64
    assert float(net["mha"].out_proj.weight.detach().var()) == pytest.approx(1 / 64, rel=0.1)
    generic = {(r.layer, r.param): (r.fan_in, r.fan_out) for r in records if r.rule == "generic"}
    assert generic == {
        ("custom", "weight"): (100, 50),
        ("bilinear", "weight"): (1200, 20),
        ("mha", "in_proj_weight"): (64, 192),
    }
    left = {(s.layer, s.param) for s in records.skipped}
    assert left == {("custom", "pos_embedding"), ("custom", "scale")}
    assert all("only *weight of >= 2 dims" in s.reason for s in records.skipped)


def test_a_parameter_tied_to_one_left_alone_is_not_drawn_either():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.full((4, 3), 7.0))  # 2-d, but not named *weight: no rule
            self.fc = nn.Linear(3, 4)
            self.fc.weight = self.table

    root = Root()
    records = init_model(root, "he_normal")
    assert torch.all(root.fc.weight == 7.0)
    assert [(r.layer, r.param) for r in records] == [("fc", "bias")]
    assert [(s.layer, s.param) for s in records.skipped] == [("", "table"), ("fc", "weight")]
    assert records.skipped[1].reason == "tied to table, left as it is there too"


def test_records_are_still_a_list():
    records = init_model(nn.Linear(3, 4), "he_normal")
    assert isinstance(records, list) and [r.param for r in records] == ["weight", "bias"]
    assert records.skipped == []
    assert math.isclose(records[0].fan_in, 3)
