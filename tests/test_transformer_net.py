"""Built transformers: each option is its paper's recipe, written out here independently of nets.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from steadygrad.data import sequence_task
from steadygrad.losses import task_loss
from steadygrad.nets import NetSpec, build
from steadygrad.structure import describe

D, N = 128, 6


def _spec(**changes) -> NetSpec:
    return NetSpec(**{"kind": "transformer", "depth": N, "width": D, "heads": 4, "seq_len": 12, "vocab": 50, **changes})


def _net(**changes):
    return build(_spec(**changes), torch.Generator().manual_seed(0))


def test_defaults_are_a_pre_ln_gelu_causal_lm():
    spec = _spec()
    assert (spec.norm, spec.norm_position, spec.activation, spec.init) == ("layer", "pre", "gelu", "glorot_uniform")
    net = build(spec)
    names = [name for name, _ in net.named_children()]
    assert names == ["embed", "pos_embed", *(f"block0{i}" for i in range(1, N + 1)), "norm", "head"]
    assert [n for n, _ in net.block01.named_children()] == ["norm1", "attn", "norm2", "mlp"]
    tokens, targets = spec.example_batch(4, torch.Generator().manual_seed(1))
    assert tokens.dtype == torch.long and tokens.shape == (4, 12)
    torch.testing.assert_close(tokens[:, 1:], targets[:, :-1])
    assert net(tokens).shape == (4, 12, 50)
    structure = describe(net)
    assert structure.kind == "transformer" and structure.skip == "residual" and structure.normalized


def _layer_norm(x, norm):
    return F.layer_norm(x, (D,), norm.weight, norm.bias, norm.eps)


def test_pre_and_post_norm_blocks_compose_as_the_papers_write_them():
    x = torch.randn(2, 12, D)
    pre = _net().block01
    h = x + pre.attn(_layer_norm(x, pre.norm1))
    torch.testing.assert_close(pre(x), h + pre.mlp(_layer_norm(h, pre.norm2)))
    post = _net(norm_position="post").block01
    h = _layer_norm(x + post.attn(x), post.norm1)
    torch.testing.assert_close(post(x), _layer_norm(h + post.mlp(h), post.norm2))


def test_deepnorm_alpha_and_beta_are_wang_et_al_decoder_values():
    net = _net(residual="deepnorm", init="glorot_normal")
    alpha, beta = (2 * N) ** 0.25, (8 * N) ** -0.25
    block = net.block02
    x = torch.randn(2, 12, D)
    h = _layer_norm(alpha * x + block.attn(x), block.norm1)
    torch.testing.assert_close(block(x), _layer_norm(alpha * h + block.mlp(h), block.norm2))
    xavier = math.sqrt(2 / (D + D))
    assert block.attn.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.03)
    assert block.attn.k_proj.weight.std().item() == pytest.approx(xavier, rel=0.03)
    for weight in (block.attn.v_proj.weight, block.attn.out_proj.weight):
        assert weight.std().item() == pytest.approx(beta * xavier, rel=0.03)
    assert block.mlp.fc1.weight.std().item() == pytest.approx(beta * math.sqrt(2 / (D + 4 * D)), rel=0.03)
    assert not hasattr(net, "norm")  # post-LN: the last block's norm is the last one


@pytest.mark.parametrize("residual", ["rezero", "skipinit"])
def test_a_zero_gate_makes_every_block_the_identity_at_init(residual):
    net = _net(residual=residual)
    assert (net.spec.norm != "none") == (residual == "skipinit")
    tokens, targets = net.spec.example_batch(3)
    x = net.embed(tokens) + net.pos_embed(torch.arange(12))
    for block in net.blocks:
        torch.testing.assert_close(block(x), x)
    loss = F.cross_entropy(net(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    # the gate gets a gradient from the first step; the branch's own weights do not (their output is multiplied by 0)
    assert net.block01.attn_gate.alpha.grad.abs().item() > 0
    assert net.block01.mlp.fc2.weight.grad.abs().max().item() == 0


def test_t_fixup_is_huang_et_al_decoder_recipe():
    net = _net(init="t_fixup")
    assert net.spec.norm == "none" and not hasattr(net.block01, "norm1")
    factor = (9 * N) ** -0.25
    assert net.embed.weight.std().item() == pytest.approx(D**-0.5 * factor, rel=0.05)
    block = net.block03
    xavier = math.sqrt(2 / (D + D))
    assert block.attn.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.03)
    assert block.attn.v_proj.weight.std().item() == pytest.approx(factor * xavier, rel=0.03)
    assert block.mlp.fc2.weight.std().item() == pytest.approx(factor * math.sqrt(2 / (5 * D)), rel=0.03)


def test_small_init_is_nguyen_and_salazar_normal():
    net = _net(init="small_init")
    std = math.sqrt(2 / (5 * D))
    for weight in (net.embed.weight, net.block01.attn.q_proj.weight, net.block01.mlp.fc2.weight, net.head.weight):
        assert weight.std().item() == pytest.approx(std, rel=0.05)
        assert weight.mean().abs().item() < 0.1 * std
    assert net.block01.attn.q_proj.bias.abs().max().item() == 0


def test_rms_norm_and_qk_norm():
    net = _net(norm="rms", qk_norm=True)
    assert type(net.block01.norm1).__name__ == "RMSNorm" and net.block01.attn.qk_norm == "rms"
    assert net.spec.label() == "transformer-6x128h4 gelu glorot_uniform rmsnorm-pre qknorm"


def test_a_built_transformer_is_reproducible_and_learns_a_copy_task():
    a, b = _net(), _net()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
    spec = NetSpec(kind="transformer", depth=2, width=32, heads=2, seq_len=8, vocab=8)
    torch.manual_seed(0)
    net = build(spec)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    # 4 tokens, a separator, the same 4 again, scored on the copy only: learnable only through attention
    task = sequence_task("copy", n=64, seq_len=8, vocab=8)
    losses = []
    for _ in range(150):
        loss = task_loss(net(task.inputs), task.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"residual": "deepnorm", "norm_position": "pre"}, "post-norm recipe"),
        ({"init": "t_fixup", "norm": "layer"}, "replaces layer normalization"),
        ({"heads": 5}, "must divide"),
        ({"skip": "residual"}, "residual by construction"),
        ({"norm": "batch"}, "none, layer or rms"),
        ({"norm_position": "before"}, "pre or post"),
    ],
)
def test_bad_transformer_specs_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        _spec(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"residual": "rezero"}, "option of kind='transformer'"),
        ({"init": "t_fixup"}, "transformer recipe"),
        ({"norm_position": "pre"}, "before or after"),
    ],
)
def test_transformer_options_on_other_kinds_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        NetSpec(kind="mlp", **changes)


def test_inputs_that_are_not_tokens_are_named():
    net = _net()
    with pytest.raises(ValueError, match="token ids"):
        net(torch.randn(2, 12))
    with pytest.raises(ValueError, match="seq_len 12"):
        net(torch.zeros(2, 13, dtype=torch.long))


def test_mup_mlp_groups_are_yang_et_al_table_3_for_adam():
    from steadygrad.nets import NetSpec as Spec

    spec = Spec(depth=3, width=256, in_features=20, parametrization="mup", base_width=64)
    net = build(spec, torch.Generator().manual_seed(0))
    assert net.head.weight.abs().max().item() == 0  # the output layer starts at zero
    plain, scaled = net.steadygrad_param_groups(1e-2)
    assert plain["lr"] == 1e-2 and scaled["lr"] == pytest.approx(1e-2 * 64 / 256)
    ids = {id(p) for p in scaled["params"]}
    assert ids == {id(net.block02.linear.weight), id(net.block03.linear.weight), id(net.head.weight)}
    assert id(net.block01.linear.weight) not in ids and all(id(p) not in ids for p in (net.head.bias,))
    assert len(plain["params"]) + len(scaled["params"]) == len(list(net.parameters()))
    standard = build(Spec(depth=3, width=256, in_features=20))
    (group,) = standard.steadygrad_param_groups(1e-3)
    assert group["lr"] == 1e-3 and len(group["params"]) == len(list(standard.parameters()))
    with pytest.raises(ValueError, match=r"'mlp'.*'transformer'"):
        Spec(kind="cnn", parametrization="mup")


def test_mup_transformer_is_yang_et_al_table_3_with_one_over_head_dim_attention():
    width, base = 128, 32
    net = _net(parametrization="mup", base_width=base)
    assert net.head.weight.abs().max().item() == 0
    head_dim = width // 4
    # 1/head_dim logits, multiplied by sqrt(base head_dim) so that they equal 1/sqrt(head_dim) at the base width
    assert net.block01.attn.scale == pytest.approx(math.sqrt(base // 4) / head_dim)
    assert build(_spec(width=base, parametrization="mup", base_width=base)).block01.attn.scale == pytest.approx(
        (base // 4) ** -0.5
    )
    plain, scaled = net.steadygrad_param_groups(1e-2)
    assert plain["lr"] == 1e-2 and scaled["lr"] == pytest.approx(1e-2 * base / width)
    hidden = {
        id(getattr(module, name).weight)
        for block in net.blocks
        for module, names in ((block.attn, ("q_proj", "k_proj", "v_proj", "out_proj")), (block.mlp, ("fc1", "fc2")))
        for name in names
    }
    assert {id(p) for p in scaled["params"]} == hidden | {id(net.head.weight)}
    plain_ids = {id(p) for p in plain["params"]}
    assert {id(net.embed.weight), id(net.pos_embed.weight), id(net.head.bias), id(net.norm.weight)} <= plain_ids
    assert len(plain_ids) + len(scaled["params"]) == len(list(net.parameters()))
    (group,) = _net().steadygrad_param_groups(1e-3)
    assert len(group["params"]) == len(list(_net().parameters()))


def test_trainer_uses_the_nets_param_groups():
    from steadygrad import data as sg_data
    from steadygrad.nets import NetSpec as Spec
    from steadygrad.train import TrainConfig, Trainer

    net = build(Spec(depth=2, width=128, in_features=2, out_features=2, parametrization="mup"))
    trainer = Trainer(net, sg_data.two_spirals(n=64), TrainConfig(epochs=1, lr=1e-2, progress=False))
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, pytest.approx(1e-2 * 64 / 128)]


def test_python_source_text_is_the_standard_librarys_and_encodes_to_ascii():
    import sysconfig
    from pathlib import Path

    from steadygrad.data import char_tokens, python_source_text

    text = python_source_text(5000, seed=3)
    assert len(text) == 5000 and text == python_source_text(5000, seed=3)
    sources = "".join(p.read_text(errors="ignore") for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    assert text[:200] in sources
    ids, vocab = char_tokens(text)
    assert vocab == 128 and ids.dtype == torch.long and int(ids.max()) < 128
    assert "".join(map(chr, ids[:50].tolist())) == text[:50]


def test_replace_lets_defaulted_fields_follow_the_new_spec():
    pre = _spec()
    assert pre.replace(residual="deepnorm").norm_position == "post"
    assert pre.replace(init="t_fixup").norm == "none"
    assert pre.replace(residual="rezero").norm == "none"
    chosen = _spec(norm="rms")
    assert chosen.replace(residual="skipinit").norm == "rms"  # a value the user chose stays
    assert NetSpec(kind="mlp").replace(kind="transformer").activation == "gelu"


def test_train_learns_a_token_set_and_kinds_and_data_that_do_not_fit_are_refused(tmp_path):
    """`steadygrad train --kind transformer --data copy` trains on the copy task: the held-out accuracy over the
    scored positions (the copied half) ends far above chance (1/31); feature data for a transformer, token data for
    an MLP, and a sweep that mixes them are usage errors naming what fits."""
    import json

    from typer.testing import CliRunner

    from steadygrad.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["train", "--kind", "transformer", "--data", "copy", "--depth", "2", "--width", "32", "--heads", "2"]
    args += ["--optimizer", "adam", "--lr", "3e-3", "--epochs", "8", "--no-progress", "--logdir", str(tmp_path / "t")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "t" / "summary.json").read_text())["final"]
    assert final["test_accuracy"] > 0.9
    result = runner.invoke(app, ["train", "--kind", "transformer", "--data", "blobs", "--no-progress"])
    assert result.exit_code == 2 and "reads token sequences" in result.output
    result = runner.invoke(app, ["train", "--data", "recall", "--no-progress"])
    assert result.exit_code == 2 and "for kind='transformer'" in " ".join(result.output.split())
    result = runner.invoke(
        app, ["sweep", "--grid", "kind=transformer", "--task", "train", "--db", str(tmp_path / "s.sqlite")]
    )
    assert result.exit_code == 2 and "reads the token sets" in " ".join(result.output.split())
    result = runner.invoke(app, ["probe", "--kind", "transformer", "--depth", "2", "--width", "32", "--seq-len", "8"])
    assert result.exit_code == 0 and "Attention entropy over 2 attention layer(s)" in result.output
