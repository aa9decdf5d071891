"""`gaea` command line: search, train, query, plot.

    gaea search                         # GAEA on the embedded digits data, NB201 space, ~1 min on a CPU
    gaea search --preset paper-cifar10 --data DIR --nb201 TABLE --out RUN_DIR
    gaea search --resume RUN_DIR
    gaea search --preset paper-pcdarts-cifar10 --data DIR --out RUN_DIR
    gaea search --space nb1shot1-2 --preset paper-nb1shot1 --data DIR --nb101 nasbench_only108.tfrecord
    gaea train --genotype RUN_DIR/result.json --preset paper-cifar10 --data DIR --out TRAIN_DIR
    gaea train --genotype DARTS_V2 --summary
    gaea query '|nor_conv_3x3~0|+|...|' --nb201 TABLE
    gaea plot RUN_DIR
    torchrun --nproc_per_node=P -m gaea_ext search ...   # data parallel

User errors (bad names, missing data, malformed tables, corrupt or unsafe checkpoints, a
RUN_DIR in use) print one line and exit with status 2; faults of a long run (non-finite steps:
3, unwritable checkpoint: 4, SIGTERM/SIGINT: 143/130 after checkpointing) are listed in
gaea_ext/search/session.py. As a command it tunes glibc malloc first (gaea_ext/allocator.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from gaea_ext import data as gdata
from gaea_ext.benchmarks.nb201 import NB201Table, TableError
from gaea_ext.search import faults, rundir, session
from gaea_ext.search.config import PRESETS, SearchConfig, resolve
from gaea_ext.search.methods import METHODS
from gaea_ext.spaces import SPACES
from gaea_ext.train.cli import add_train_parser, cmd_train


class UserError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        sys.stderr.write(f"gaea: error: {message}\n")
        sys.exit(2)


def _search_args(p: argparse.ArgumentParser) -> None:
    d = SearchConfig()
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="a published recipe or the CPU proxy")
    a("--space", choices=SPACES, help=f"search space (default {d.space})")
    a("--method", choices=METHODS, help=f"search method (default {d.method})")
    a("--dataset", choices=gdata.DATASETS + gdata.STREAMED, help=f"dataset (default {d.dataset}, embedded)")
    a("--data", metavar="DIR", help="dataset root (torchvision layout, ImageFolder tree or .tar.gz)")
    a("--nb201", metavar="PATH", help="NAS-Bench-201 table (CSV or NATS-Bench file) to score the found cells")
    a("--nb101", metavar="FILE", help="nb1shot1-*: nasbench_only108.tfrecord (or its cached .npz) to score the cells")
    a("--epochs", type=int)
    a("--batch-size", type=int)
    a("--channels", type=int, help="C, the first stage's width")
    a("--cells", type=int, help="N, cells per stage")
    a("--resolution", type=int, help="resize images to this side length")
    a("--train-images", type=int, help="class-balanced subset of the training set")
    a("--include-none", dest="exclude_none", action="store_const", const=False,
      help="keep the `none` op (default in the darts/pcdarts spaces)")
    a("--exclude-none", dest="exclude_none", action="store_const", const=True,
      help="drop the `none` op (default in nb201)")
    a("--partial", type=int, metavar="K",
      help="pcdarts, nb1shot1-*: 1/K of the channels through the mixed op (4; ImageNet 2)")
    a("--stem", choices=("cifar", "imagenet"), help="darts/pcdarts stem (default by dataset)")
    a("--lr", type=float, help="SGD learning rate of the shared weights (cosine schedule)")
    a("--lr-min", type=float, help="learning rate at the end of the cosine schedule")
    a("--lr-warmup", type=int, metavar="EPOCHS", help="linear learning-rate warm-up before the cosine")
    a("--weight-decay", type=float)
    a("--arch-lr", type=float, help="architecture step size (GAEA: EG lr, DARTS: Adam lr)")
    a("--arch-eps", type=float, help="GAEA simplex clamp")
    a("--edge-lr", type=float, help="GAEA EG step size of the pcdarts edge weights")
    a("--arch-grad-clip", type=float, help="clip the architecture gradient norm")
    a("--gdas-kl", type=float, help="gaea-gdas: weight of the KL-to-uniform regularizer")
    a("--tau-max", type=float, help="gaea-gdas: initial Gumbel-softmax temperature")
    a("--tau-min", type=float, help="gaea-gdas: temperature at the last epoch")
    a("--arch-warmup", type=int, metavar="EPOCHS", help="train weights only for this many epochs first")
    a("--bilevel", action="store_const", const=True, help="architecture gradient on a held-out half")
    a("--arch-batch", choices=("independent", "same"), help="minibatch of the architecture gradient")
    a("--valid-fraction", type=float, help="bilevel: share of the training set held out (default 0.5)")
    a("--subsets", type=float, nargs=2, metavar=("W", "A"),
      help="per-class random fractions of the training set for the weight and architecture steps")
    a("--select", choices=("last", "best-valid"), help="which epoch's genotype the run returns")
    a("--amp", choices=("bf16", "fp16"), help="mixed precision (autocast)")
    a("--channels-last", action="store_const", const=True, help="NHWC memory layout")
    a("--prune-below", type=float, metavar="T",
      help="stop computing candidates whose weight fell below T on an edge (approximate; see README)")
    a("--cuda-graphs", action="store_const", const=True,
      help="record the whole search step as a CUDA graph and replay it (CUDA, one process)")
    a("--compile", nargs="?", const="inductor", metavar="BACKEND",
      help="run the supernet's forward through torch.compile (default backend inductor)")
    a("--workers", type=int, help="decode processes for streamed (ImageNet) data")
    a("--seed", type=int)
    a("--no-fused", dest="fused", action="store_const", const=False, help="pure-PyTorch reference kernels")
    a("--device", help="cpu, cuda or auto")
    a("--out", metavar="RUN_DIR", help="write config, log, checkpoints and result here")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    a("--stop-after", type=int, metavar="N", help="stop after N more epochs (resume later)")
    session.add_fault_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gaea", description="Geometry-aware NAS with fused kernels")
    sub = p.add_subparsers(dest="cmd", parser_class=Parser)
    s = sub.add_parser("search", help="run an architecture search")
    _search_args(s)
    q = sub.add_parser("query", help="look an architecture up in the NAS-Bench-201 table")
    q.add_argument("arch")
    q.add_argument("--nb201", metavar="PATH", required=True)
    add_train_parser(sub)
    pl = sub.add_parser("plot", help="write PNG plots of a run")
    pl.add_argument("run_dir")
    return p


def _config(args) -> tuple[SearchConfig, Optional[str], bool]:
    """The run's config, its directory, and whether it resumes."""
    session.elastic_resume(args)
    if args.resume:
        cfg = rundir.resumed_config(args.resume, args.out, SearchConfig)
        # Where and how long to run may change on resume; what is searched may not.
        session.runtime_overrides(cfg, args)
        return cfg, args.resume, True
    skip = {"cmd", "preset", "out", "resume"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        cfg = resolve(args.preset, overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    rundir.ensure_fresh(args.out)
    return cfg, args.out, False


def cmd_search(args) -> int:
    from gaea_ext.search import dist
    from gaea_ext.search.loop import Search, genotype_str, pick_device

    cfg, out, resuming = _config(args)
    if cfg.cuda_graphs and (pick_device(cfg.device).type != "cuda" or "WORLD_SIZE" in os.environ):
        raise UserError("--cuda-graphs needs a CUDA device and a single process")
    with session.owned(out, resuming):
        state = rundir.load_checkpoint(os.path.join(out, "checkpoint.pt")) if resuming else None
        search = Search(cfg, out)
        try:
            if search.main and out:
                if not resuming:
                    rundir.write_json(os.path.join(out, "config.json"), cfg.to_dict())
                    rundir.truncate_log(os.path.join(out, "log.jsonl"), 0)  # of a run that never checkpointed
                    if search.manifest is not None:
                        rundir.write_json(os.path.join(out, "subsets.json"), search.manifest)
            if state is not None:
                search.load_state_dict(state)
                if search.main:
                    rundir.truncate_log(os.path.join(out, "log.jsonl"), search.epoch)
                    inside = "" if search.sums is None else f" step {search.loader_w.position}/{len(search.loader_w)}"
                    print(f"resuming {out} at epoch {search.epoch}/{cfg.epochs}{inside}")
            with session.guarded(search.guard, "search", out):
                result = search.run()
            if search.main:
                line = f"genotype {genotype_str(result['genotype'])} entropy {result['arch_entropy']:.3f}"
                for bench in ("nb201", "nb101"):
                    if bench in result:
                        line += "".join(f" {k} {v:.2f}" for k, v in result[bench].items() if isinstance(v, float))
                print(line)
        finally:
            search.close()
            dist.shutdown()
    return 0


def cmd_query(args) -> int:
    table = NB201Table.load(args.nb201)
    print(json.dumps(table.query(args.arch), indent=2))
    return 0


def cmd_plot(args) -> int:
    from gaea_ext.search.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The `gaea` command. Run as the process's command (argv None: `gaea ...`, `python -m
    gaea_ext ...`) it first applies the command's malloc settings (gaea_ext.allocator; opt out
    with GAEA_MALLOC=default); called with an argument list, as tests and other programs do,
    it leaves the process's allocator alone."""
    if argv is None:
        from gaea_ext import allocator

        allocator.configure()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return 2
    try:
        return {"search": cmd_search, "train": cmd_train, "query": cmd_query, "plot": cmd_plot}[args.cmd](args)
    except (faults.Preempted, faults.NonFiniteError, rundir.CheckpointWriteError) as e:
        return session.report(e)
    except (UserError, gdata.DataError, TableError, rundir.RunDirError, ValueError) as e:
        sys.stderr.write(f"gaea: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("gaea: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
