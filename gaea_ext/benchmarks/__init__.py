"""Tabular NAS benchmarks: evaluate a searched architecture by lookup instead of training."""
from gaea_ext.benchmarks.nb201 import (
    EDGES,
    OPS,
    NB201Table,
    TableError,
    arch_str,
    parse_arch,
    random_arch,
    table_dataset,
)

__all__ = ["OPS", "EDGES", "TableError", "arch_str", "parse_arch", "random_arch", "table_dataset",
           "NB201Table"]
