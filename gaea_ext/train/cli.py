"""`gaea train`: train a cell from scratch.

    gaea train --genotype DARTS_V2                       # the demo: digits, ~1 min on a CPU
    gaea train --genotype RUN_DIR/result.json --preset paper-cifar10 --data DIR --out RUN
    gaea train --genotype PC_DARTS --preset paper-cifar10 --summary   # params 3.63M
    gaea train --resume RUN
    torchrun --nproc_per_node=P -m gaea_ext train ...   # data parallel

User errors raise TrainError or GenotypeError (both ValueError), DataError or RunDirError; the
`gaea` entry point prints them as one line and exits 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from gaea_ext import data as gdata
from gaea_ext.search import faults, rundir, session
from gaea_ext.train.config import PRESETS, SHAPES, TrainConfig, TrainError, check, resolve

DATASETS = (*gdata.DATASETS, "imagenet")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a DARTS-space cell from scratch")
    a = p.add_argument
    a("--genotype", metavar="FILE_OR_NAME", help="DARTS_V2, PC_DARTS, PC_DARTS_IMAGENET, a genotype JSON "
                                                 "or a search's result.json")
    a("--preset", choices=sorted(PRESETS), help="a published recipe (default: demo on digits)")
    a("--dataset", choices=DATASETS, help="dataset (default digits, embedded)")
    a("--data", metavar="DIR", help="dataset root")
    a("--epochs", type=int)
    a("--batch-size", type=int)
    a("--channels", type=int, help="C, the first cells' width")
    a("--layers", type=int, help="number of cells")
    a("--lr", type=float, help="initial SGD learning rate")
    a("--lr-min", type=float, help="learning rate at the end of the schedule")
    a("--warmup-epochs", type=int, help="linear learning-rate warm-up epochs")
    a("--weight-decay", type=float)
    a("--cutout", type=int, metavar="PIXELS", help="cutout square side (0: off)")
    a("--auxiliary-weight", type=float, help="weight of the auxiliary head's loss (0: no head)")
    a("--drop-path", type=float, help="final drop-path probability (ramped linearly from 0)")
    a("--label-smoothing", type=float)
    a("--amp", choices=("bf16", "fp16"), help="mixed precision")
    a("--channels-last", action="store_const", const=True, help="NHWC memory format")
    a("--train-images", type=int, help="class-balanced subset of the training set")
    a("--resolution", type=int, help="resize images to this side length")
    a("--seed", type=int)
    a("--device", help="cpu, cuda or auto")
    a("--workers", type=int, help="decoding processes of the streaming (imagenet) loader")
    a("--out", metavar="RUN_DIR", help="write config, log, checkpoints and result here")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    a("--stop-after", type=int, metavar="N", help="stop after N more epochs (resume later)")
    a("--summary", action="store_true", help="print the parameter count and exit without training")
    session.add_fault_args(p)
    return p


_NOT_CONFIG = {"cmd", "preset", "out", "resume", "summary"}


def _config(args) -> tuple[TrainConfig, Optional[str], bool]:
    """The run's config, its directory, and whether it resumes."""
    from gaea_ext.spaces import genotypes

    session.elastic_resume(args)
    if args.resume:
        cfg = rundir.resumed_config(args.resume, args.out, TrainConfig)
        # Where and how long to run may change on resume; what is trained may not.
        session.runtime_overrides(cfg, args)
        return check(cfg), args.resume, True
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    cfg = resolve(args.preset, overrides)
    if not cfg.genotype:
        raise TrainError("--genotype is required (a built-in name such as DARTS_V2, or a JSON file)")
    cfg.genotype_json = genotypes.to_json(genotypes.load(cfg.genotype))
    rundir.ensure_fresh(args.out)
    return cfg, args.out, False


def summary(cfg: TrainConfig) -> float:
    """Build the network (no data) and return its parameter count in millions."""
    from gaea_ext.train.loop import build_network, genotype_of
    from gaea_ext.train.network import param_count_m

    if cfg.dataset not in SHAPES:
        raise TrainError(f"--summary does not know the classes of dataset {cfg.dataset}; "
                         f"use one of {', '.join(SHAPES)}")
    classes, channels = SHAPES[cfg.dataset]
    return param_count_m(build_network(cfg, genotype_of(cfg), classes, channels))


def cmd_train(args) -> int:
    from gaea_ext.search import dist
    from gaea_ext.train.loop import Trainer

    cfg, out, resuming = _config(args)
    if getattr(args, "summary", False):
        classes = SHAPES[cfg.dataset][0] if cfg.dataset in SHAPES else "?"
        print(f"params {summary(cfg):.2f}M ({cfg.dataset}: C={cfg.channels}, {cfg.layers} cells, {classes} classes; "
              "auxiliary head excluded)")
        return 0
    with session.owned(out, resuming):
        state = rundir.load_checkpoint(os.path.join(out, "checkpoint.pt")) if resuming else None
        trainer = Trainer(cfg, out)
        try:
            if trainer.main and out and not resuming:
                rundir.write_json(os.path.join(out, "config.json"), cfg.to_dict())
                rundir.truncate_log(os.path.join(out, "log.jsonl"), 0)  # of a run that never checkpointed
            if state is not None:
                trainer.load_state_dict(state)
                if trainer.main:
                    rundir.truncate_log(os.path.join(out, "log.jsonl"), trainer.epoch)
                    inside = "" if trainer.sums is None else \
                        f" step {trainer.train_loader.position}/{len(trainer.train_loader)}"
                    print(f"resuming {out} at epoch {trainer.epoch}/{cfg.epochs}{inside}")
            with session.guarded(trainer.guard, "train", out):
                result = trainer.run()
            if trainer.main:
                print(f"params {result['params_m']:.2f}M test top-1 {result['final_test_top1']:.2f} "
                      f"(best {result['best_test_top1']:.2f} at epoch {result['best_epoch']}) "
                      f"top-5 {result['final_test_top5']:.2f}")
        finally:
            trainer.close()
            dist.shutdown()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry (`python -m gaea_ext.train.cli train ...`), same error handling as `gaea`."""
    parser = argparse.ArgumentParser(prog="gaea")
    add_train_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except (faults.Preempted, faults.NonFiniteError, rundir.CheckpointWriteError) as e:
        return session.report(e)
    except (ValueError, gdata.DataError, rundir.RunDirError) as e:
        sys.stderr.write(f"gaea: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
