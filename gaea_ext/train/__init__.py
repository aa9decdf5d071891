"""`gaea train`: train a DARTS-space cell from scratch (the DARTS evaluation protocol).

Modules: network (NetworkCIFAR, NetworkImageNet, param_count_m), config (TrainConfig, PRESETS,
resolve), loop (Trainer, make_loaders), cli (add_train_parser, cmd_train).
"""
from .config import PRESETS, TrainConfig, TrainError, resolve
from .network import NetworkCIFAR, NetworkImageNet, param_count_m

__all__ = ["NetworkCIFAR", "NetworkImageNet", "PRESETS", "TrainConfig", "TrainError", "param_count_m", "resolve"]
