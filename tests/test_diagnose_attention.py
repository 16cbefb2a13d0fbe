"""The attention rules: collapsed and growing attention is found; healthy fresh transformers stay quiet."""

import math

import pytest
import torch

from steadygrad.diagnose import attention_collapse, attention_logit_growth, diagnose
from steadygrad.measure import probe
from steadygrad.measure.records import FlowReport, LayerRecord
from steadygrad.nets import NetSpec, build

SPEC = NetSpec(kind="transformer", depth=3, width=64, heads=4, seq_len=16, vocab=40)


def _attention_kinds(findings):
    return {f.kind for f in findings} & {"attention_entropy_collapse", "attention_logit_growth"}


@pytest.mark.parametrize(
    "changes", [{}, {"norm_position": "post"}, {"residual": "rezero"}, {"init": "t_fixup"}, {"qk_norm": True}]
)
def test_fresh_built_transformers_get_no_attention_finding(changes):
    spec = SPEC.replace(**changes)
    net = build(spec, torch.Generator().manual_seed(0))
    report = probe(net, *spec.example_batch(8, torch.Generator().manual_seed(1)))
    assert all(0.5 < r.attn_entropy_fraction <= 1 for r in report.records if math.isfinite(r.attn_entropy_fraction))
    assert not _attention_kinds(diagnose(report))


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100)
        return transformers.GPT2LMHeadModel(config)
    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    return transformers.BertForMaskedLM(config)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_fresh_hf_models_in_eager_attention_get_no_attention_finding(name):
    model = _hf(name)
    model.config._attn_implementation = "eager"
    tokens = torch.randint(0, 100, (4, 32))
    report = probe(model, {"input_ids": tokens, "labels": tokens})
    assert any(math.isfinite(r.attn_entropy_fraction) for r in report.records)
    assert not _attention_kinds(diagnose(report))


def test_attention_with_huge_query_and_key_weights_is_found_collapsed():
    net = build(SPEC, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in net.blocks:
            block.attn.q_proj.weight.mul_(30)
            block.attn.k_proj.weight.mul_(30)
    report = probe(net, *SPEC.example_batch(8, torch.Generator().manual_seed(1)))
    (finding,) = attention_collapse([report])
    assert finding.layers == ["block01", "block02", "block03"]
    assert all(f < 0.1 for f in finding.evidence["entropy_fraction"].values())
    assert [fix.action for fix in finding.fixes] == ["rebuild", "warmup", "lower_lr"]
    assert finding.fixes[0].params == {"qk_norm": True}


def _report(step, logit):
    record = LayerRecord("block01", "TransformerBlock", 0, attn_max_logit=logit, attn_entropy_fraction=0.5)
    return FlowReport(records=[record], step=step)


def test_logit_growth_needs_growth_and_a_large_end():
    assert attention_logit_growth([_report(1, 4.0), _report(50, 60.0)])[0].layers == ["block01"]
    assert not attention_logit_growth([_report(1, 4.0), _report(50, 25.0)])  # 6x, and e^25 is not one-hot yet
    assert not attention_logit_growth([_report(1, 20.0), _report(50, 60.0)])  # 3x: large but not growing 10x
    assert not attention_logit_growth([_report(1, 4.0)])


def test_training_at_a_high_learning_rate_grows_the_logits_and_the_rule_sees_it():
    from steadygrad.lab import _lm

    spec = NetSpec(kind="transformer", depth=2, width=64, heads=4, seq_len=32, vocab=128)
    net = build(spec, torch.Generator().manual_seed(0))
    from steadygrad.measure import Monitor

    optimizer = torch.optim.Adam(net.parameters(), lr=3e-2)
    generator = torch.Generator().manual_seed(1)
    with Monitor(net, optimizer=optimizer, every=20) as monitor:
        for _ in range(81):
            x, y = _lm.batch(_lm.corpus(), 16, 32, generator)
            loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert "attention_logit_growth" in _attention_kinds(diagnose(monitor.history.reports))


def test_the_doctor_can_rebuild_a_built_transformer_with_qk_norm():
    from steadygrad.diagnose import Fix
    from steadygrad.doctor._candidates import _BUILDERS

    net = build(SPEC)

    class Ctx:
        model = net

        def generator(self):
            return torch.Generator().manual_seed(0)

    (candidate,) = _BUILDERS["rebuild"](Fix("rebuild", {"qk_norm": True}), Ctx())
    assert "qk_norm=True" in candidate.patch
    assert candidate.make(net).spec.qk_norm
