"""How a search space declares its architecture parameters, and how it receives their weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch


@dataclass(frozen=True)
class ArchParam:
    name: str
    shape: tuple
    kind: str = "ops"  # "ops": rows mix an edge's candidate ops; "edges": rows weight a node's inputs


@dataclass
class ArchWeights:
    """Mixing weights by parameter name; ``hard`` (GDAS) names the one op to compute per row."""

    w: Dict[str, torch.Tensor]
    hard: Optional[Dict[str, List[int]]] = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.w[name]

    def index(self, name: str) -> Optional[List[int]]:
        return None if self.hard is None else self.hard.get(name)

    def detach(self) -> "ArchWeights":
        return ArchWeights({k: v.detach() for k, v in self.w.items()}, self.hard)
