"""The residual-stream rules: a compounding stream and a post-LN stack whose bottom is cut off from the gradient are
found; fresh and briefly trained healthy stacks (pre-LN, post-LN, gated, T-Fixup, DeepNorm, GPT-2's blocks, a
zero-init-residual ResNet) stay quiet."""

import math

import pytest
import torch
import torch.nn.functional as F

from steadygrad import theory
from steadygrad.data import char_tokens, next_token_windows, python_source_text
from steadygrad.diagnose import (
    STREAM_GROWTH_PER_BLOCK,
    diagnose,
    stream_gradient_vanishing,
    stream_growth,
)
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build
from tests import zoo

SPEC = NetSpec(kind="transformer", depth=8, width=64, heads=4, seq_len=32, vocab=128)
STREAM_KINDS = {"residual_stream_growth", "post_ln_vanishing_gradient"}


@pytest.fixture(scope="module")
def text():
    return char_tokens(python_source_text(40_000))[0]


def _batch(text, seed, size=16, length=32):
    return next_token_windows(text, size, length, torch.Generator().manual_seed(seed))


def _trained(spec, text, steps=10, lr=3e-3):
    """``spec`` after ``steps`` Adam steps at ``lr`` without warmup on next-character prediction."""
    net = build(spec, torch.Generator().manual_seed(20))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.98))
    for step in range(steps):
        x, y = _batch(text, 100 + step)
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def _stream_kinds(findings):
    return {f.kind for f in findings} & STREAM_KINDS


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"norm_position": "post"},
        {"residual": "deepnorm"},
        {"residual": "rezero"},
        {"residual": "skipinit"},
        {"init": "t_fixup"},
        {"qk_norm": True},
        {"norm": "rms"},
    ],
)
def test_fresh_built_transformers_get_no_stream_finding(changes, text):
    spec = SPEC.replace(**changes)
    net = build(spec, torch.Generator().manual_seed(0))
    report = probe(net, *_batch(text, 1))
    assert sum(r.kind == "TransformerBlock" for r in report.records) == SPEC.depth
    assert not _stream_kinds(diagnose(report, net))


def test_a_briefly_trained_pre_ln_stack_is_quiet_though_its_stream_grew(text):
    """Ten steps at lr 3e-3 grow a pre-LN stream about 30x over 8 blocks (1.6x per block): large, and normal for a
    trained pre-LN model; it stays under the 2x-per-block bound of additive growth."""
    net = _trained(SPEC, text)
    report = probe(net, *_batch(text, 1))
    blocks = [r for r in report.records if r.kind == "TransformerBlock"]
    growth = blocks[-1].act_second_moment / blocks[0].act_second_moment
    assert growth > 8  # it did grow, more than the linear law's bound L = 8
    assert growth ** (1 / 7) < STREAM_GROWTH_PER_BLOCK
    assert not _stream_kinds(diagnose(report, net))


def test_a_post_ln_stack_trained_without_warmup_is_found_cut_off_at_the_bottom(text):
    net = _trained(SPEC.replace(norm_position="post"), text)
    report = probe(net, *_batch(text, 1))
    (finding,) = stream_gradient_vanishing(report, net)
    assert finding.kind == "post_ln_vanishing_gradient" and "block01" in finding.layers
    blocks = [r for r in report.records if r.kind == "TransformerBlock"]
    assert finding.evidence["bottom_over_top"] == pytest.approx(blocks[0].grad_norm / blocks[-1].grad_norm)
    assert finding.evidence["bottom_over_top"] < 1e-2
    assert [(f.action, f.params) for f in finding.fixes[:3]] == [
        ("rebuild", {"norm_position": "pre"}),
        ("rebuild", {"residual": "deepnorm"}),
        ("warmup", {"steps": 100}),
    ]
    findings = diagnose(report, net)
    assert "post_ln_vanishing_gradient" in {f.kind for f in findings}
    # the generic depth rule leaves the stream to this one (its fixes, batch norm and skips, do not apply)
    block_labels = {r.label for r in blocks}
    assert not any(f.kind == "vanishing_gradients" and block_labels & set(f.layers) for f in findings)


def test_the_same_steps_leave_a_pre_ln_bottom_its_gradient(text):
    report = probe(_trained(SPEC, text), *_batch(text, 1))
    assert not stream_gradient_vanishing(report)


def test_a_norm_free_residual_stack_is_found_compounding(text):
    """x <- x + F(x) without a norm: each block multiplies the stream's second moment by 1 + Var F / Var x."""
    spec = SPEC.replace(norm="none")
    net = build(spec, torch.Generator().manual_seed(0))
    report = probe(net, *_batch(text, 1))
    (finding,) = stream_growth(report, net)
    assert finding.kind == "residual_stream_growth"
    moments = finding.evidence["second_moments"]
    assert finding.evidence["growth"] == pytest.approx(moments[-1] / moments[0]) and finding.evidence["growth"] > 100
    assert finding.evidence["per_block"] > STREAM_GROWTH_PER_BLOCK
    assert [f.params for f in finding.fixes[:2]] == [{"residual": "rezero"}, {"norm": "layer", "norm_position": "pre"}]


def _hf(name: str, layers: int = 4, intermediate: int = 256):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=32, vocab_size=128)
        ), "GPT2Block"
    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4
        )
        return transformers.LlamaForCausalLM(config), "LlamaDecoderLayer"
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM(config), "BertLayer"


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_fresh_hf_models_record_their_blocks_and_are_quiet(name, text):
    """The default selection records a stack's blocks (its residual stream) beside the layers inside them."""
    model, block = _hf(name)
    tokens = _batch(text, 1)[0]
    report = probe(model, {"input_ids": tokens, "labels": tokens})
    blocks = [r for r in report.records if r.kind == block]
    assert len(blocks) == 4
    # a block's record is the stream: it borrows no weight statistics from the first layer inside it
    assert all(math.isnan(r.weight_var) and math.isnan(r.weight_grad_norm) for r in blocks)
    assert not _stream_kinds(diagnose(report, model))


def test_layerscale_transformer_blocks_are_quiet():
    """DINOv2's blocks scale each branch by a LayerScale of 1e-5 at initialization: the stream barely changes and its
    gradient passes whole, which neither stream rule may read as a problem."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        layerscale_value=1e-5,
    )
    model = transformers.Dinov2Model(config)
    report = probe(model, {"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))})
    assert sum(r.kind == "Dinov2Layer" for r in report.records) == 4
    assert not _stream_kinds(diagnose(report, model))


def test_a_bert_trained_without_warmup_is_found_cut_off_at_the_bottom(text):
    """BERT is post-LN. Twenty masked-LM steps at Adam lr 3e-3 without warmup (6 layers, BERT's own 3072-wide MLP):
    the bottom layer's gradient falls from the top's to under 1/100 of it."""

    model, _ = _hf("bert", layers=6, intermediate=3072)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(20):
        tokens = _batch(text, 100 + step)[0]
        masked = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(step)) < 0.15
        labels = tokens.masked_fill(~masked, -100)
        loss = model(input_ids=tokens.masked_fill(masked, 0), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens = _batch(text, 1)[0]
    report = probe(model, {"input_ids": tokens, "labels": tokens})
    (finding,) = stream_gradient_vanishing(report, model)
    assert finding.layers[0].startswith("bert.encoder.layer.0 ") and finding.evidence["bottom_over_top"] < 1e-2
    # not a steadygrad net: no rebuild, and the generic finding on the layers inside the blocks is left out
    assert [f.action for f in finding.fixes] == ["warmup", "lower_lr"]
    findings = diagnose(report, model)
    assert "post_ln_vanishing_gradient" in {f.kind for f in findings}
    assert not any(
        f.kind == "vanishing_gradients" and "bert.encoder.layer.0.output.dense" in f.layers for f in findings
    )
    # the report's gradient sentence reads the same stream the finding does
    assert report.summary().startswith("Gradient shrinks") and "at bert.encoder.layer.0 (BertLayer)" in report.summary()


def test_only_named_blocks_repeated_in_a_container_are_recorded_as_blocks():
    from torch import nn

    from steadygrad.measure import select_layers

    plain = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)))
    assert all(type(m) is not nn.Sequential for _, m in select_layers(plain))
    model, _ = zoo.resnet18()
    assert sum(type(m).__name__ == "BasicBlock" for _, m in select_layers(model)) == 8
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 3)
    assert [n for n, m in select_layers(encoder) if isinstance(m, nn.TransformerEncoderLayer)] == [
        "layers.0",
        "layers.1",
        "layers.2",
    ]


def test_a_zero_init_residual_resnets_blocks_are_quiet():
    model, images = zoo.resnet18()
    report = probe(model, images)
    assert sum(r.kind == "BasicBlock" for r in report.records) == 8
    assert not _stream_kinds(diagnose(report, model))


def test_pre_ln_stream_law_is_exact_for_independent_branches():
    """theory.pre_ln_stream against a simulation: each block adds an independent N(0, c) branch of LN(x)."""
    g = torch.Generator().manual_seed(0)
    width, depth, c = 1024, 12, 0.7
    x = 1.5 * torch.randn(256, width, generator=g, dtype=torch.float64)
    measured = [float(x.square().mean())]
    for _ in range(depth):
        weight = torch.randn(width, width, generator=g, dtype=torch.float64) * (c / width) ** 0.5
        x = x + F.layer_norm(x, (width,)) @ weight.T
        measured.append(float(x.square().mean()))
    predicted = theory.pre_ln_stream(depth, measured[0], c)
    assert predicted == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("backward_through_branch", [True, False])
def test_post_ln_gradient_is_the_product_of_the_blocks_gains(backward_through_branch):
    """theory.post_ln_gradient against autograd through x <- LN(x + W x): a linear branch (g = v) leaves the gradient
    flat; the same branch with its gradient path cut (g = 0) divides it by sqrt(1 + v) per sublayer."""
    g = torch.Generator().manual_seed(0)
    width, depth, s2 = 1024, 6, 3.0
    weights = [torch.randn(width, width, generator=g, dtype=torch.float64) * (s2 / width) ** 0.5 for _ in range(depth)]
    x0 = F.layer_norm(torch.randn(32, width, generator=g, dtype=torch.float64), (width,)).requires_grad_(True)
    streams, x = [x0], x0
    for w in weights:
        branch = x @ w.T if backward_through_branch else x.detach() @ w.T
        x = F.layer_norm(x + branch, (width,))
        x.retain_grad()
        streams.append(x)
    (x * torch.randn(x.shape, generator=g, dtype=torch.float64)).sum().backward()
    measured = [float(s.grad.norm() / streams[-1].grad.norm()) for s in streams]
    gains = [[s2]] * depth
    predicted = theory.post_ln_gradient(gains, gains if backward_through_branch else [[0.0]] * depth)
    assert predicted == pytest.approx(measured, rel=0.1)
    if not backward_through_branch:
        assert measured[0] == pytest.approx((1 + s2) ** (-depth / 2), rel=0.1)


def test_theory_inputs_are_checked():
    with pytest.raises(ValueError, match="depth"):
        theory.pre_ln_stream(0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        theory.post_ln_gradient([[1.0, 2.0]], [[1.0]])


def test_the_doctor_adds_what_only_training_shows_and_can_rebuild_it_pre_ln(text):
    """The doctor's preflight probe sees the model at initialization, where a post-LN stack is healthy; the probe of
    its control after training finds the cut-off bottom, and the finding's first fix rebuilds the net pre-LN."""
    from steadygrad.doctor._candidates import Context, candidates_for
    from steadygrad.doctor._data import Batch
    from steadygrad.doctor._run import _after_training
    from steadygrad.doctor._trial import Settings

    spec = SPEC.replace(norm_position="post")
    batch = Batch(*_batch(text, 1))
    fresh = build(spec, torch.Generator().manual_seed(20))
    assert not _after_training(fresh, batch, Settings(), 0, [])
    net = _trained(spec, text)
    (finding,) = _after_training(net, batch, Settings(), 10, [])
    assert finding.kind == "post_ln_vanishing_gradient" and finding.message.startswith("After the control's 10")
    assert not _after_training(net, batch, Settings(), 10, [finding])  # the preflight's own are not repeated
    ctx = Context(net, batch.inputs, 1.0, Settings(), 0, 10)
    candidates, _ = candidates_for([finding], ctx)
    rebuilt = candidates[0].make(net)
    assert candidates[0].name == "rebuilt with norm_position='pre'"
    assert rebuilt.spec == spec.replace(norm_position="pre") and rebuilt.block01.pre


def test_negative_gains_are_named_as_such():
    with pytest.raises(ValueError, match="finite and >= 0"):
        theory.post_ln_gradient([[-1.0]], [[1.0]])


def test_plain_stacks_of_modules_named_like_blocks_keep_the_generic_depth_rules():
    """A user's ``ConvLayer`` (conv, sigmoid) repeated in a Sequential is recorded as a block series, but it holds no
    attention: a vanishing gradient there is the generic finding with its fixes, not a post-LN diagnosis."""
    from torch import nn

    class SigmoidLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.act = nn.Linear(32, 32), nn.Sigmoid()

        def forward(self, x):
            return self.act(self.linear(x))

    torch.manual_seed(0)
    model = nn.Sequential(*(SigmoidLayer() for _ in range(12)), nn.Linear(32, 10))
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    report = probe(model, x, y)
    assert sum(r.kind == "SigmoidLayer" for r in report.records) == 12
    kinds = {f.kind for f in diagnose(report, model)}
    assert "vanishing_gradients" in kinds and not kinds & STREAM_KINDS
