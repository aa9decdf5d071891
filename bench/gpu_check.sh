#!/usr/bin/env bash
# One prepared GPU check: build with CUDA, run the CUDA tests, the kernel benchmarks, and the
# search/train step benchmarks (NB201, DARTS, PC-DARTS, GDAS, DARTS_V2 training).
# For a machine with an NVIDIA GPU and torch already installed (no network needed):
#   bash bench/gpu_check.sh            # writes bench/gpu_results/ (or $OUT when set)
# Budget: about 7 minutes on an H200 (build ~2-3 min for one arch, tests ~1 min, bench ~3 min)
# plus the three 2-epoch search slices (PATHS="fused graphs" to run fewer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench/gpu_results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python}
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296}
# Only the local GPU's arch: a third of the compile time of the portable default list.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch;print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-16}

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
if ! GAEA_FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUTDIR/build.log" 2>&1; then
  tail -40 "$OUTDIR/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s: $($PY -c 'import gaea_ext;print(gaea_ext.build_info())')"

echo "== CUDA tests"
$PY -m pytest python_tests -q -x -k "cuda" -p no:cacheprovider --junitxml="$OUTDIR/cuda_tests.xml" 2>&1 | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== kernel benchmarks"
$PY bench/kernels.py --device cuda --markdown-out "$OUTDIR/kernels_cuda.md" 2>&1 | tail -40

echo "== search and train steps (papers' batch sizes), fused vs no-fused"
$PY bench/search_speed.py --device cuda --steps 10 --warmup 3 --markdown-out "$OUTDIR/search_speed_cuda.md" 2>&1 | tail -30

echo "== NB201 paper-cifar10 GAEA search: a timed slice of 2 of 25 epochs: fused, --no-fused, fused + --cuda-graphs"
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
if [ -e "$DATA" ]; then
  for path in ${PATHS:-fused no-fused graphs}; do
    case $path in no-fused) flag=--no-fused ;; graphs) flag=--cuda-graphs ;; *) flag= ;; esac
    rm -rf "$OUTDIR/paper-$path"
    $PY -m gaea_ext search --preset paper-cifar10 --data "$DATA" --stop-after 2 $flag --out "$OUTDIR/paper-$path" 2>&1 | grep -v "^ *[0-9]*%" | tail -3
    $PY - "$OUTDIR/paper-$path" "$path" <<'PYEOF'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl")]
secs = log[-1]["seconds"]  # the second epoch: no first-epoch warm-up costs
print(f"{sys.argv[2]}: epoch {log[-1]['epoch']} {secs:.1f} s, {log[-1]['images_per_s']:.0f} img/s, "
      f"peak {log[-1]['peak_mem_mb']:.0f} MiB -> 25 epochs ~ {25 * secs / 60:.1f} min (training only)")
PYEOF
  done
else
  echo "no CIFAR-10 at $DATA (set DATA=...): skipped"
fi

echo "== summary: cuda tests rc=$tests_rc; tables in $OUTDIR"
exit "$tests_rc"
