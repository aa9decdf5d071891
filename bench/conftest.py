"""pytest-benchmark setup for the gaea_ext kernel benchmarks.

Run them with

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
        python -m pytest bench --benchmark-only

(see kernels.py for why GLIBC_TUNABLES). They are benchmarks, not tests: the project's test
run (`python -m pytest python_tests`, or plain `pytest`, whose testpaths is python_tests)
never collects bench/, and if bench/ is collected without --benchmark-only (or
--benchmark-disable, for a one-call smoke run) every benchmark here is skipped.

After the run a summary lists, per benchmark, the median, GB/s against the bytes that must
move (extra_info["bytes"]) and the time over the fused kernel's in the same group; the
same two numbers are added to each benchmark's extra_info in --benchmark-json output.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # bench_cases, also under --import-mode=importlib
    sys.path.insert(0, str(BENCH_DIR))


def _in_bench(item) -> bool:
    return BENCH_DIR in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("benchmark"):
        reason = "pytest-benchmark is not installed (pip install pytest-benchmark)"
    elif config.getoption("benchmark_only", False) or config.getoption("benchmark_disable", False):
        return
    else:
        reason = "benchmarks: run `python -m pytest bench --benchmark-only`"
    for item in items:
        if _in_bench(item):
            item.add_marker(pytest.mark.skip(reason=reason))


def _derived(benchmarks):
    """{id(bench): (median s, GB/s, time/fused or None)} for benchmarks that recorded bytes.

    `benchmarks` yields (id, extra_info, median seconds or None).
    """
    fused = {}
    rows = []
    for key, info, median in benchmarks:
        if median is None or "bytes" not in info:
            continue
        rows.append((key, info, median))
        if info.get("contender") == "fused":
            fused[info["case"]] = median
    out = {}
    for key, info, median in rows:
        f = fused.get(info["case"])
        out[key] = (median, info["bytes"] / median / 1e9, median / f if f else None)
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    entries = output_json.get("benchmarks", [])
    derived = _derived((i, b.get("extra_info", {}), b.get("stats", {}).get("median"))
                       for i, b in enumerate(entries))
    for i, (median, gbps, ratio) in derived.items():
        entries[i]["extra_info"]["gbps_median"] = gbps
        entries[i]["extra_info"]["time_over_fused"] = ratio


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)  # pytest-benchmark's session object
    if bs is None or getattr(bs, "disabled", True):
        return
    try:
        benches = [(b.fullname, b.extra_info, b.stats.median if b else None) for b in bs.benchmarks]
    except AttributeError:  # a pytest-benchmark whose internals differ: skip the summary
        return
    derived = _derived(benches)
    if not derived:
        return
    infos = {key: info for key, info, _ in benches}
    tr = terminalreporter
    tr.section("gaea_ext kernels: median, GB/s (bytes that must move), time / fused")
    by_case = {}
    for key in derived:
        by_case.setdefault(infos[key]["case"], []).append(key)
    width = max(len(infos[k]["contender"]) for k in derived)
    for case, keys in by_case.items():
        tr.write_line(f"{case}  ({infos[keys[0]]['bytes']} bytes)")
        for key in sorted(keys, key=lambda k: derived[k][0]):
            median, gbps, ratio = derived[key]
            ratio_s = f"{ratio:6.2f}x" if ratio is not None else "    n/a"
            tr.write_line(f"  {infos[key]['contender']:<{width}}  {median * 1e3:10.4f} ms  "
                          f"{gbps:9.3f} GB/s  {ratio_s}")
