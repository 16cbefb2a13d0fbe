"""Initialization: variance-scaling schemes, orthogonal, the bad choices, a registry, whole-model init.

import steadygrad as sg
w = sg.init.he_uniform_(torch.empty(32, 10))   # Var[w] = 2 / fan_in
sg.init.init_model(model, "he_normal")          # every Linear/Conv/RNN, matched to its activation
"""

from steadygrad.init.fans import NONLINEARITIES, Fans, calculate_gain, fans
from steadygrad.init.fixup import fixup_
from steadygrad.init.lsuv import lsuv_
from steadygrad.init.model import InitRecords, InitSkip, LayerInit, init_model, mean_field_, next_activation
from steadygrad.init.pretrain import pretrain_autoencoders
from steadygrad.init.registry import InitScheme, available, get, register, scheme_info
from steadygrad.init.schemes import (
    constant_,
    glorot_normal_,
    glorot_uniform_,
    he_normal_,
    he_uniform_,
    identical_,
    lecun_normal_,
    lecun_uniform_,
    orthogonal_,
    scaled_normal_,
)

__all__ = [
    "NONLINEARITIES",
    "Fans",
    "InitRecords",
    "InitScheme",
    "InitSkip",
    "LayerInit",
    "available",
    "calculate_gain",
    "constant_",
    "fans",
    "fixup_",
    "get",
    "glorot_normal_",
    "glorot_uniform_",
    "he_normal_",
    "he_uniform_",
    "identical_",
    "init_model",
    "lecun_normal_",
    "lecun_uniform_",
    "lsuv_",
    "mean_field_",
    "next_activation",
    "orthogonal_",
    "pretrain_autoencoders",
    "register",
    "scaled_normal_",
    "scheme_info",
]
