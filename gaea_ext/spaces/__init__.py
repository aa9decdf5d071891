"""Search spaces: weight-sharing supernets whose cells mix candidate ops with fused kernels."""
from gaea_ext.spaces.nb201 import NB201Network

SPACES = ("nb201",)

__all__ = ["NB201Network", "SPACES"]
