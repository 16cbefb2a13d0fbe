"""Normalization: batch, layer, instance, group and RMS norm on one statistics core with a hand-derived
backward, drop-in for torch.nn; model conversion both ways; BatchNorm folding for inference.

    from steadygrad import norm
    bn = norm.BatchNorm2d(64)                       # same arguments and state_dict as nn.BatchNorm2d
    model = norm.convert_norms(model)               # every torch norm -> steadygrad's
    fast = norm.fold_batchnorm(model.eval())        # BN folded into the preceding Linear/Conv
"""

from steadygrad.norm import functional
from steadygrad.norm.convert import convert_norms, convert_sync_batchnorm
from steadygrad.norm.fold import FoldResult, fold_batchnorm, fold_batchnorm_report
from steadygrad.norm.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FoldResult",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "convert_norms",
    "convert_sync_batchnorm",
    "fold_batchnorm",
    "fold_batchnorm_report",
    "functional",
]
