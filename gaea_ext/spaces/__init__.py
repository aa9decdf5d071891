"""Search spaces: weight-sharing supernets whose cells mix candidate ops with fused kernels."""
from gaea_ext.spaces.darts import DartsNetwork
from gaea_ext.spaces.nb1shot1 import NAMES as NB1SHOT1_SPACES, NB1Shot1Network
from gaea_ext.spaces.nb201 import NB201Network

SPACES = ("nb201", "darts", "pcdarts", *NB1SHOT1_SPACES)


def build_network(space: str, *, channels: int, cells: int, num_classes: int, in_channels: int,
                  exclude_none: bool, fused: bool, partial: int = 4, stem: str = "cifar"):
    """The supernet of ``space``. nb201: ``cells`` per stage; darts/pcdarts/nb1shot1-*: ``cells`` in all."""
    if space == "nb201":
        return NB201Network(channels, cells, num_classes, in_channels, exclude_none, fused)
    if space in ("darts", "pcdarts"):
        pc = space == "pcdarts"
        return DartsNetwork(channels, cells, num_classes, in_channels, exclude_none=exclude_none, fused=fused,
                            partial=partial if pc else 1, edge_weights=pc, stem=stem)
    if space in NB1SHOT1_SPACES:
        return NB1Shot1Network(NB1SHOT1_SPACES[space], channels, cells, num_classes, in_channels, fused=fused,
                               partial=partial)
    raise ValueError(f"unknown space {space!r}; choose from {', '.join(SPACES)}")


__all__ = ["DartsNetwork", "NB1Shot1Network", "NB201Network", "SPACES", "build_network"]
