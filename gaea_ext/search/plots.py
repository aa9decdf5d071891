"""`gaea plot RUN_DIR`: entropy per epoch, architecture weights per edge, benchmark accuracy."""
from __future__ import annotations

import os
from typing import List

from gaea_ext.benchmarks.nb201 import EDGES
from gaea_ext.search import rundir


def plot_run(run_dir: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise rundir.RunDirError("gaea plot needs matplotlib: pip install matplotlib") from None
    log = rundir.read_log(os.path.join(run_dir, "log.jsonl"))
    if not log:
        raise rundir.RunDirError(f"{run_dir} has no log.jsonl records to plot")
    config = rundir.read_json(os.path.join(run_dir, "config.json"))
    result_path = os.path.join(run_dir, "result.json")
    op_names = rundir.read_json(result_path)["op_names"] if os.path.exists(result_path) else None
    epochs = [r["epoch"] for r in log]
    written = []

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [r["arch_entropy"] for r in log], marker="o")
    ax.set(xlabel="epoch", ylabel="mean edge entropy (nats)", title=f"{config['method']} on {config['dataset']}")
    written.append(_save(fig, run_dir, "entropy.png"))

    tables = _tables([r["arch_weights"] for r in log])
    for name, weights in tables.items():
        n_edges, n_ops = len(weights[0]), len(weights[0][0])
        fig, axes = plt.subplots(1, n_edges, figsize=(2.2 * n_edges, 3.2), sharey=True, squeeze=False)
        for e, ax in enumerate(axes[0]):
            grid = [[w[e][o] for w in weights] for o in range(n_ops)]
            ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest",
                      extent=(epochs[0] - 0.5, epochs[-1] + 0.5, n_ops - 0.5, -0.5))
            i, j = EDGES[e] if n_edges == len(EDGES) else (e, "")
            ax.set(title=f"edge {i}->{j}" if j != "" else f"edge {e}", xlabel="epoch")
            ax.set_yticks(range(n_ops))
            ax.set_yticklabels(op_names or [str(o) for o in range(n_ops)], fontsize=7)
        suffix = "" if name == "cell" else f"_{name}"
        written.append(_save(fig, run_dir, f"arch_weights{suffix}.png"))

    if any("nb201" in r for r in log):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        keys = [k for k, v in next(r["nb201"] for r in log if "nb201" in r).items() if isinstance(v, float)]
        for k in keys:
            ax.plot([r["epoch"] for r in log if "nb201" in r], [r["nb201"][k] for r in log if "nb201" in r],
                    marker="o", label=k)
        ax.set(xlabel="epoch", ylabel="benchmark test accuracy (%)", title="derived cell in NAS-Bench-201")
        ax.legend()
        written.append(_save(fig, run_dir, "nb201.png"))
    return written


def _tables(weights: list) -> dict:
    """Op-weight tables per epoch by name: NB201 logs one table, DARTS spaces a dict of them
    (op tables normal/reduce; PC-DARTS edge rows are not plotted)."""
    if isinstance(weights[0], dict):
        names = [k for k in ("normal", "reduce") if k in weights[0]]
        return {k: [w[k] for w in weights] for k in names}
    return {"cell": weights}


def _save(fig, run_dir: str, name: str) -> str:
    path = os.path.join(run_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path
