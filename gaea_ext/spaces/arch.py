"""How a search space declares its architecture parameters, and how it receives their weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class ArchParam:
    name: str
    shape: tuple
    kind: str = "ops"  # "ops": rows mix an edge's candidate ops; "edges": rows weight a node's inputs


@dataclass
class ArchWeights:
    """Mixing weights by parameter name, and optionally, per row, which ops to compute
    (``hard``): an int, the one op GDAS sampled (scaled straight-through); a tuple of op
    indices, the ops a pruned search still computes (the usual weighted sum over them); None,
    every op."""

    w: Dict[str, torch.Tensor]
    hard: Optional[Dict[str, List[Union[int, Tuple[int, ...], None]]]] = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.w[name]

    def index(self, name: str) -> Optional[List[Union[int, Tuple[int, ...], None]]]:
        return None if self.hard is None else self.hard.get(name)

    def detach(self) -> "ArchWeights":
        return ArchWeights({k: v.detach() for k, v in self.w.items()}, self.hard)
