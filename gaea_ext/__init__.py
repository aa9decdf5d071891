"""gaea_ext: fused kernels for geometry-aware (exponentiated-gradient) NAS."""
import torch  # loads libc10/libtorch, which _C links against

from gaea_ext._C import build_info as _build_info  # also registers the torch.ops.gaea kernels
from gaea_ext import reference
from gaea_ext.ops import eg_update_, mixed_op, mixed_op_pf
from gaea_ext.bn_mixed import mixed_op_bn
from gaea_ext.optim import ExpGrad

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled extension was built: cuda (bool), torch, cuda_version, archs."""
    return dict(_build_info())


__all__ = ["mixed_op", "mixed_op_pf", "mixed_op_bn", "eg_update_", "ExpGrad", "reference", "build_info", "__version__"]
