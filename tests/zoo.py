"""A zoo of small models for the rules: healthy ones as their authors initialize them, and deliberately broken ones.

Each builder returns ``(model, inputs)`` with a fixed seed, small enough to probe in well under a second. A
``Case`` says what the diagnosis must contain (``expect``: finding kinds that must appear) or that nothing at
warning level or above may appear (``healthy``). To add a model (a Keras one, a checkpointed or compiled one),
write a builder and add a ``Case`` to ``CASES``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

SEED = 0


def _gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(batch: int = 4, length: int = 16, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=_gen(1))


# -- Hugging Face models from config (random weights, the library's own init) -------------------------------


def gpt2(layers: int = 2):
    import transformers

    torch.manual_seed(SEED)
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config), {"input_ids": _tokens()}


def bert():
    import transformers

    torch.manual_seed(SEED)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertForMaskedLM(config), {"input_ids": _tokens()}


def t5():
    import transformers

    torch.manual_seed(SEED)
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=64)
    ids = _tokens()
    return transformers.T5ForConditionalGeneration(config), {"input_ids": ids, "decoder_input_ids": ids[:, :8]}


def llama(initializer_range: float = 0.02) -> Callable:
    """A Llama (RMSNorm, SiLU-gated MLP, rotary attention) with its labels: the model's own loss is measured."""

    def build():
        import transformers

        torch.manual_seed(SEED)
        config = transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            initializer_range=initializer_range,
        )
        ids = torch.randint(0, 128, (4, 16), generator=_gen(1))
        return transformers.LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}

    return build


def albert():
    """ALBERT shares one transformer layer across depth: the layer's modules are called once per depth (4 here),
    which the reuse rule reads as a recurrence; healthy, it must stay quiet."""
    import transformers

    torch.manual_seed(SEED)
    config = transformers.AlbertConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return transformers.AlbertForMaskedLM(config), {"input_ids": _tokens()}


def vit():
    import transformers

    torch.manual_seed(SEED)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.ViTForImageClassification(config), {
        "pixel_values": torch.randn(4, 3, 16, 16, generator=_gen(1))
    }


def timm_model(name: str, **kwargs) -> Callable:
    """A timm model as its authors initialize it (``pretrained=False``). timm imports torchvision, which this
    project's machines cannot install (its only wheel for torch 2.13 is a CUDA build that fails to import), so
    these cases skip here and run wherever timm imports."""

    def build():
        import timm

        torch.manual_seed(SEED)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return model, torch.randn(4, 3, 32, 32, generator=_gen(1))

    return build


def scaled_weights(build: Callable, factor: float) -> Callable:
    """``build``'s model with every Linear/Conv1D weight multiplied by ``factor`` (an init too small or too large)."""

    def scaled():
        model, inputs = build()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                    module.weight.mul_(factor)
        return model, inputs

    scaled.__name__ = f"{build.__name__}_x{factor:g}"
    return scaled


def normal_weights(build: Callable, std: float) -> Callable:
    """``build``'s model with every Linear/Conv1D weight drawn again from N(0, std^2)."""

    def redrawn():
        model, inputs = build()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                    module.weight.normal_(0, std, generator=_gen(2))
        return model, inputs

    redrawn.__name__ = f"{build.__name__}_std{std:g}"
    return redrawn


# -- a torchvision-style ResNet-18 (BasicBlock, one ReLU module called twice per block, zero_init_residual) -----


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn, plus the identity or a 1x1 conv-bn shortcut, with
    its one ``relu`` called twice. ``dynamic`` adds control flow on a value, which torch.fx cannot trace."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.dynamic and bool(out.mean() > 1e6):
            out = out * 0.5
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, widths=(8, 16, 32, 64), classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero_init_residual=True: each block starts as the identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18():
    torch.manual_seed(SEED)
    return ResNet18(), torch.randn(8, 3, 16, 16, generator=_gen(1))


# -- a ConvNeXt-style net with LayerScale ----------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):  # (N, C, H, W)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ChannelsLayerNorm(nn.LayerNorm):
    def forward(self, x):  # (N, C, H, W), normalized over C
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32), depths=(2, 2), classes: int = 10):
        super().__init__()
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsLayerNorm(dims[0]))])
        for a, b in itertools.pairwise(dims):
            self.downsample.append(nn.Sequential(ChannelsLayerNorm(a), nn.Conv2d(a, b, 2, 2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)]) for d, n in zip(dims, depths, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], classes)
        for m in self.modules():  # ConvNeXt's init: truncated normal 0.02, zero bias
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for down, stage in zip(self.downsample, self.stages, strict=True):
            x = stage(down(x))
        return self.head(self.norm(x.mean((2, 3))))


def convnext():
    torch.manual_seed(SEED)
    return ConvNeXt(), torch.randn(4, 3, 32, 32, generator=_gen(1))


# -- torch's own transformer encoder, and MLPs -----------------------------------------------------------------


def transformer_encoder():
    torch.manual_seed(SEED)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(4, 10, 32, generator=_gen(1))


def mlp_zero_head():
    """A ReLU MLP whose output layer starts at zero (a common choice for policy and value heads, and the last
    layer of many fine-tuning heads): every gradient upstream of the head is exactly zero at step 0."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    nn.init.zeros_(model[4].weight)
    nn.init.zeros_(model[4].bias)
    return model, torch.randn(32, 16, generator=_gen(1))


def mlp_small_head():
    """A tanh MLP with PPO's policy-head init: orthogonal layers of gain sqrt(2), the output layer of gain 0.01
    so that the first policy is near uniform."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 6))
    for layer, gain in ((model[0], math.sqrt(2)), (model[2], math.sqrt(2)), (model[4], 0.01)):
        nn.init.orthogonal_(layer.weight, gain)
        nn.init.zeros_(layer.bias)
    return model, torch.randn(32, 16, generator=_gen(1))


def _stack(depth: int, width: int, activation: type[nn.Module], std: float | None = None) -> nn.Sequential:
    """``depth`` (Linear, activation) pairs; with ``std``, every Linear's weight redrawn from N(0, std^2) (each from
    the same seed)."""
    model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), activation())])
    if std is not None:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0, std, generator=_gen(2))
    return model


def tanh_saturated():
    """Ten (Linear 64, Tanh) with weights of std sqrt(3) (fan-in 64: pre-activations of std about 14)."""
    torch.manual_seed(SEED)
    model = _stack(10, 64, nn.Tanh, std=math.sqrt(3))
    return model, torch.randn(64, 64, generator=_gen(1))


def dead_first_relu():
    """A ReLU MLP whose first layer's bias is -10: every unit of the first ReLU is off for every sample."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    nn.init.constant_(model[0].bias, -10.0)
    return model, torch.randn(32, 16, generator=_gen(1))


def relu_huge():
    """Ten (Linear 64, ReLU) with weights of std 1 (fan-in 64: each layer multiplies the signal by about 5.7)."""
    torch.manual_seed(SEED)
    model = _stack(10, 64, nn.ReLU, std=1.0)
    return model, torch.randn(64, 64, generator=_gen(1))


def tanh_small():
    """Eight (Linear 64, Tanh) with weights of std 0.01 (each layer scales the signal by about 0.08)."""
    torch.manual_seed(SEED)
    model = _stack(8, 64, nn.Tanh, std=0.01)
    return model, torch.randn(64, 64, generator=_gen(1))


def deep_sigmoid():
    """Twenty (Linear 64, Sigmoid) with PyTorch's default init: sigmoid's derivative is at most 1/4."""
    torch.manual_seed(SEED)
    return _stack(20, 64, nn.Sigmoid), torch.randn(64, 64, generator=_gen(1))


# -- the cases -------------------------------------------------------------------------------------------------


class HandWrittenRecurrence(nn.Module):
    """h_t = W h_{t-1} + U x_t in a Python loop, W = radius x an orthogonal matrix: the gradient reaching step 1
    from the last is radius^(T-1) of it (closed form for a linear recurrence)."""

    def __init__(self, radius: float, width: int = 16, inputs: int = 4) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(inputs, width), nn.Linear(width, 2)
        self.rec = nn.Linear(width, width, bias=False)
        q, _ = torch.linalg.qr(torch.randn(width, width))
        with torch.no_grad():
            self.rec.weight.copy_(radius * q)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.rec.in_features)
        for t in range(x.shape[1]):
            h = self.rec(h) + self.inp(x[:, t])
        return self.out(h)


def recurrence(radius: float, steps: int = 20) -> Callable:
    def build():
        torch.manual_seed(SEED)
        return HandWrittenRecurrence(radius), torch.randn(8, steps, 4, generator=_gen(2))

    return build


class _ReZeroBlock(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)
        self.alpha = nn.Parameter(torch.zeros(()))  # ReZero (Bachlechner et al. 2020): every branch starts off

    def forward(self, x):
        return x + self.alpha * self.fc2(self.act(self.fc1(x)))


def rezero():
    torch.manual_seed(SEED)
    model = nn.Sequential(*[_ReZeroBlock() for _ in range(4)], nn.Linear(32, 5))
    return model, torch.randn(16, 32, generator=_gen(1))


class _GatedRecurrence(nn.Module):
    """h_t = tanh(x_t + sigmoid(G x_t) * h_{t-1}) from h_0 = 0: the gate's first call gets exactly zero gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] + torch.sigmoid(self.gate(x[:, t])) * h)
        return self.head(h)


def gated_recurrence():
    torch.manual_seed(SEED)
    return _GatedRecurrence(), torch.randn(4, 5, 8, generator=_gen(1))


class _CellLoop(nn.Module):
    """An ``nn.LSTMCell`` unrolled in a Python loop, reading out the last state; ``forget_bias`` adds to the
    forget gate's bias (gates i, f, g, o in torch's layout): -5 shuts it, sigmoid(-5) = 0.007, so the cell
    keeps almost nothing from one step to the next."""

    def __init__(self, forget_bias: float = 0.0) -> None:
        super().__init__()
        self.cell, self.head = nn.LSTMCell(16, 32), nn.Linear(32, 2)
        with torch.no_grad():
            self.cell.bias_hh[32:64].add_(forget_bias)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 32)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def lstm_cell_loop(forget_bias: float = 0.0) -> Callable:
    def build():
        torch.manual_seed(SEED)
        return _CellLoop(forget_bias), torch.randn(8, 20, 16, generator=_gen(1))

    return build


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def nn_lstm():
    torch.manual_seed(SEED)
    return _LSTM(), torch.randn(8, 20, 16, generator=_gen(1))


@dataclass(frozen=True)
class Case:
    """A model and what its diagnosis must say: nothing at warning or above (``healthy``), or these kinds."""

    name: str
    build: Callable[[], tuple[nn.Module, object]]
    expect: frozenset[str] = field(default_factory=frozenset)  # finding kinds that must appear
    forbid: frozenset[str] = field(default_factory=frozenset)  # finding kinds that must not appear
    needs: str | None = None  # a module the case needs installed (pytest.importorskip)

    @property
    def healthy(self) -> bool:
        return not self.expect


def _case(name, build, expect=(), forbid=(), needs=None) -> Case:
    return Case(name, build, frozenset(expect), frozenset(forbid), needs)


HEALTHY = [
    _case("gpt2", gpt2, needs="transformers"),
    _case("bert", bert, needs="transformers"),
    _case("t5", t5, needs="transformers"),
    _case("vit", vit, needs="transformers"),
    _case("resnet18", resnet18),
    _case("convnext", convnext),
    _case("transformer_encoder", transformer_encoder),
    _case("mlp_zero_head", mlp_zero_head),
    _case("mlp_small_head", mlp_small_head),
    _case("recurrence_orthogonal", recurrence(1.0)),
    _case("rezero", rezero),
    _case("llama_with_labels", llama(), needs="transformers"),
    _case("albert_shared_layers", albert, needs="transformers"),
    _case("lstm_cell_loop", lstm_cell_loop()),  # a default LSTM forgets ~half per step at init: not vanishing
    _case("nn_lstm", nn_lstm),
    _case("gated_recurrence", gated_recurrence),
    _case("timm_resnet18", timm_model("resnet18"), needs="timm"),
    _case("timm_convnext_atto", timm_model("convnext_atto"), needs="timm"),
]

BROKEN = [
    _case("tanh_saturated", tanh_saturated, expect={"saturated_activations"}),
    _case("dead_first_relu", dead_first_relu, expect={"dead_units"}, forbid={"poor_signal_propagation"}),
    _case("deep_sigmoid", deep_sigmoid, expect={"vanishing_gradients"}),
    _case("tanh_small", tanh_small, expect={"vanishing_gradients"}),
    _case("gpt2_tiny", scaled_weights(gpt2, 1e-3), expect={"vanishing_gradients"}, needs="transformers"),
    _case("bert_tiny", scaled_weights(bert, 1e-3), expect={"vanishing_gradients"}, needs="transformers"),
    _case("bert_std1e-4", normal_weights(bert, 1e-4), expect={"vanishing_gradients"}, needs="transformers"),
    # LayerNorm bounds a huge-init transformer's forward and its stream's gradient grows only ~2x per block, but
    # every weight layer multiplies the gradient by ~11 (sqrt(fan_in * E[W^2]) = 0.02 * 100 * sqrt(32))
    _case("gpt2_huge", scaled_weights(gpt2, 100), expect={"exploding_gradients"}, needs="transformers"),
    # T5 has no 1/sqrt(d) in its attention: at x100 the softmax saturates to one-hot and Q/K get exactly zero
    _case("t5_huge", scaled_weights(t5, 100), expect={"exploding_gradients"}, needs="transformers"),
    _case("vit_huge", scaled_weights(vit, 1e3), expect={"exploding_gradients"}, needs="transformers"),
    _case("relu_huge", relu_huge, expect={"exploding_gradients"}),
    # 50x the default std: every layer's gain stays under 10 at width 64, but the loss at init says it
    _case("llama_huge", llama(1.0), expect={"loss_at_init_high"}, needs="transformers"),
    _case("recurrence_exploding", recurrence(1.6), expect={"exploding_over_time"}),
    _case("recurrence_vanishing", recurrence(0.3), expect={"vanishing_over_time"}),
    _case("lstm_cell_forget_gate_shut", lstm_cell_loop(-5.0), expect={"vanishing_over_time"}),
]

CASES = HEALTHY + BROKEN
