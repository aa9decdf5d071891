#!/usr/bin/env bash
# The prepared GPU check, in stages that each fit one device command (<= 10 min) with room to
# rerun one after a fix inside a 15-minute device budget:
#
#   bash bench/gpu_check.sh build      # CUDA kernels for the local GPU's arch only, in place
#   bash bench/gpu_check.sh tests      # every CUDA test case (pytest -m cuda), no -x, junit file
#   bash bench/gpu_check.sh kernels    # bench/kernels.py --device cuda (ratio table)
#   bash bench/gpu_check.sh steps      # bench/search_speed.py --device cuda (search/train steps)
#   bash bench/gpu_check.sh search     # NB201 paper-cifar10 search slices: fused, no-fused, graphs
#   bash bench/gpu_check.sh build tests    # several stages in one command, in that order
#
# Stage times on one H200 (16 CPU cores). None has run on a GPU yet: these are ESTIMATES,
# from the CPU build times here and the work each stage does; replace them with measured ones.
#   build    ~2 min  (4 .cu files for one arch, 16 parallel jobs: bounded by the slowest file,
#                    mixed_op_pf_cuda.cu; the CPU-only part adds ~30 s. Timeout 280 s.)
#   tests    ~3-4 min (905 CUDA cases, 880 of them numeric forward/backward/EG cases of
#                    milliseconds each; the rest: 11 gradchecks, 4 torch.compile cases (one
#                    inductor), 5 --cuda-graphs tests running 2-3 tiny searches each, CUDA and
#                    cuDNN start-up. Stopped by SIGINT at $TESTS_TIMEOUT=280 s, which still writes
#                    the junit file for what ran; TEST_PATHS=... runs a subset.)
#   kernels  ~2 min  (kernels.py: its torch.compile contenders are compiled by inductor first,
#                    ~20-40 s each; then 30 rotating repetitions of ms-scale samples; timeout 280 s)
#   steps    ~2-3 min (search_speed.py, 5 cases x 2 paths x (10 + 3 warm-up) steps at the papers'
#                    batch sizes, ~0.05-0.3 s a step on a GPU, plus model builds and cuDNN
#                    heuristics; timeout 280 s; then host_cost.py --launches: op counts, CUDA
#                    kernels per step from the profiler, tiny host-bound steps, ~1 min, timeout 120 s)
#   search   ~3-4 min (3 paths x 2 epochs of 200 steps, a 12,800-image slice of CIFAR-10, plus
#                    decoding the images on the first run; each path under timeout 150 s)
# Later stages reuse the build (they refuse to run without a CUDA build rather than rebuild).
# Everything goes under $OUT when set (else bench/gpu_results/); each stage's last line is a
# one-line summary starting with "SUMMARY <stage>:". Exit status: non-zero if any stage failed.
# For a machine with an NVIDIA GPU and torch installed; no network needed. Without a GPU,
# `build` still compiles (for 9.0) and `tests` collects the CUDA cases and skips them.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${OUT:-bench/gpu_results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for bench/ scripts too
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296}
export MAX_JOBS=${MAX_JOBS:-16}

have_gpu() { $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
now() { date +%s; }

need_build() {
  if ! $PY -c "import gaea_ext,sys; sys.exit(0 if gaea_ext.build_info()['cuda'] else 1)" 2>/dev/null; then
    echo "SUMMARY $1: no CUDA build of gaea_ext here; run 'bash bench/gpu_check.sh build' first"
    return 1
  fi
}

need_gpu() {
  if ! have_gpu; then echo "SUMMARY $1: skipped, no GPU visible (torch.cuda.is_available() is False)"; return 1; fi
}

stage_build() {
  local start arch
  start=$(now)
  # Only the local GPU's arch (a third of the compile time of the portable default list); 9.0
  # (H200) when no GPU is visible, so the CPU machines check the same compile.
  if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then arch=$TORCH_CUDA_ARCH_LIST
  elif have_gpu; then arch=$($PY -c "import torch;print('%d.%d' % torch.cuda.get_device_capability())")
  else arch=9.0; fi
  echo "== build: TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$MAX_JOBS (in place; ninja reuses objects on a rerun)"
  if ! GAEA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch timeout "${BUILD_TIMEOUT:-280}" \
      $PY setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1; then
    tail -30 "$OUTDIR/build.log"
    echo "SUMMARY build: FAILED after $(( $(now) - start )) s (log: $OUTDIR/build.log)"
    return 1
  fi
  local info
  info=$($PY -c "import gaea_ext;print(gaea_ext.build_info())" 2>&1)
  echo "SUMMARY build: ok in $(( $(now) - start )) s; $info"
}

stage_tests() {
  need_build tests || return 1
  local start rc
  start=$(now)
  echo "== tests: every CUDA case (-m cuda), all failures reported (no -x)"
  # SIGINT, not SIGTERM: pytest then stops like on Ctrl-C and still writes its junit file.
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "${TESTS_TIMEOUT:-280}" $PY -m pytest ${TEST_PATHS:-python_tests} -q -m cuda \
    -p no:cacheprovider -rfE --junitxml="$OUTDIR/cuda_tests.xml" > "$OUTDIR/cuda_tests.log" 2>&1
  rc=$?
  tail -40 "$OUTDIR/cuda_tests.log"
  [ $rc -eq 124 ] && echo "(stopped at the ${TESTS_TIMEOUT:-280} s timeout: the counts below cover what ran)"
  local counts
  counts=$($PY - "$OUTDIR/cuda_tests.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no junit file"); sys.exit()
s = root if root.tag == "testsuite" else root.find("testsuite")
n, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - sk} passed, {f} failed, {e} errors, {sk} skipped of {n}")
PYEOF
)
  echo "SUMMARY tests: rc=$rc; $counts in $(( $(now) - start )) s (junit: $OUTDIR/cuda_tests.xml)"
  return $rc
}

stage_kernels() {
  need_gpu kernels || return 0
  need_build kernels || return 1
  local start rc
  start=$(now)
  echo "== kernels: bench/kernels.py --device cuda"
  timeout "${KERNELS_TIMEOUT:-280}" $PY bench/kernels.py --device cuda --markdown-out "$OUTDIR/kernels_cuda.md" \
    > "$OUTDIR/kernels_cuda.log" 2>&1
  rc=$?
  tail -40 "$OUTDIR/kernels_cuda.log"
  echo "SUMMARY kernels: rc=$rc in $(( $(now) - start )) s (table: $OUTDIR/kernels_cuda.md)"
  return $rc
}

stage_steps() {
  need_gpu steps || return 0
  need_build steps || return 1
  local start rc
  start=$(now)
  echo "== steps: search and train steps at the papers' batch sizes, fused vs no-fused"
  timeout "${STEPS_TIMEOUT:-280}" $PY bench/search_speed.py --device cuda --steps 10 --warmup 3 \
    --markdown-out "$OUTDIR/search_speed_cuda.md" > "$OUTDIR/search_speed_cuda.log" 2>&1
  rc=$?
  tail -30 "$OUTDIR/search_speed_cuda.log"
  # Issue 11: ops dispatched and CUDA kernels (profiler) per search step, fused vs no-fused,
  # plus the host-bound tiny step on this machine's CPU.
  timeout "${HOST_TIMEOUT:-120}" $PY bench/host_cost.py --launches --paper-steps 0 --reps 10 \
    --markdown-out "$OUTDIR/host_cost_cuda.md" > "$OUTDIR/host_cost_cuda.log" 2>&1
  local rc2=$?
  grep -E "kernels per step|ops dispatched per step" "$OUTDIR/host_cost_cuda.log" || tail -5 "$OUTDIR/host_cost_cuda.log"
  [ $rc -eq 0 ] && rc=$rc2
  echo "SUMMARY steps: rc=$rc in $(( $(now) - start )) s (tables: $OUTDIR/search_speed_cuda.md, $OUTDIR/host_cost_cuda.md)"
  return $rc
}

stage_search() {
  need_gpu search || return 0
  need_build search || return 1
  local start data="" images=${SEARCH_IMAGES:-12800} failed=0 lines=""
  start=$(now)
  for d in "${DATA:-}" ../shared/data/cifar10-jpeg.tar.gz shared/data/cifar10-jpeg.tar.gz; do
    if [ -n "$d" ] && [ -e "$d" ]; then data=$d; break; fi
  done
  if [ -z "$data" ]; then
    echo "SUMMARY search: skipped, no CIFAR-10 (set DATA=...; looked in ../shared/data and shared/data)"
    return 0
  fi
  echo "== search: NB201 paper-cifar10 GAEA, 2 epochs on $images images per path (${PATHS:-fused no-fused graphs})"
  for path in ${PATHS:-fused no-fused graphs}; do
    case $path in no-fused) flag=--no-fused ;; graphs) flag=--cuda-graphs ;; *) flag= ;; esac
    rm -rf "$OUTDIR/paper-$path"
    timeout "${SEARCH_TIMEOUT:-150}" $PY -m gaea_ext search --preset paper-cifar10 --data "$data" \
      --train-images "$images" --stop-after 2 $flag --out "$OUTDIR/paper-$path" > "$OUTDIR/paper-$path.log" 2>&1
    local rc=$?
    grep -v "^ *[0-9]*%" "$OUTDIR/paper-$path.log" | tail -3
    if [ $rc -ne 0 ]; then failed=1; lines="$lines $path: rc=$rc;"; continue; fi
    lines="$lines $($PY - "$OUTDIR/paper-$path" "$path" "$images" <<'PYEOF'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl")]
r = log[-1]  # the second epoch: no first-epoch warm-up or capture costs
full = 50000 / int(sys.argv[3])  # paper-cifar10 trains on the 50k training images
print(f"{sys.argv[2]}: {r['images_per_s']:.0f} img/s, peak {r['peak_mem_mb']:.0f} MiB, "
      f"25 full epochs ~ {25 * r['seconds'] * full / 60:.1f} min;", end="")
PYEOF
)"
  done
  echo "SUMMARY search: rc=$failed in $(( $(now) - start )) s;$lines"
  return $failed
}

[ $# -eq 0 ] && { sed -n '2,12p' "$0"; exit 2; }
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
status=0
for stage in "$@"; do
  case $stage in
    build|tests|kernels|steps|search) "stage_$stage" || status=1 ;;
    *) echo "unknown stage '$stage'; choose from build tests kernels steps search"; exit 2 ;;
  esac
done
exit $status
