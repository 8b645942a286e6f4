#!/usr/bin/env bash
# The GPU check of sidfast. On a machine with a CUDA GPU, from the repository root:
#
#   bash benchmarks/gpu_session.sh --budget 360 build tests ops plans
#   bash benchmarks/gpu_session.sh --budget 330 build-any engine      (whole SiD iterations; no rebuild)
#   python benchmarks/collect_results.py OUTDIR...                      (the OUT folder of each run)
#
# and commit benchmarks/results/. The engine stage installs diffusers from .whl/ when it is there
# (bash benchmarks/fetch_wheels.sh fetches the wheels once, on a machine with network access).
#
#   bash benchmarks/gpu_session.sh [--dry-run] [--budget SECONDS] STAGE [STAGE ...]
#
# Stages, in the order given:
#   build      pip install -e . with the CUDA extension; if that fails (an nvcc whose CUDA differs from
#              torch's), the CPU ops only, said in device.json and BUILD-WITHOUT-CUDA in the log
#   build-any  the build already there if it imports (a warm machine), else the CPU ops only: the engine runs
#              the Triton kernels and needs no CUDA extension, and the CPU build is the quicker one
#   tests      every test file of the ops, the SiD and SiDA losses, the kernel noise, the engine, LoRA and
#              the discriminator taps (test_train: -k "cuda or gpu or engine") IN FULL on CUDA, side by
#              side, each under its own time limit; one line per file in tests.tsv as each finishes
#   ops        the op benchmarks (fused losses and noising vs eager and torch.compile, bandwidth vs copy)
#   plans      the sid_loss kernel-plan sweep and the host-overhead benchmarks
#   compile    register and spill report of every kernel configuration (compile_report.py)
#   engine     whole SiD iterations, engine_session.py (compiles side by side, times one at a time)
# Each stage gets what is left of --budget (seconds, default 360) less a reserve for the final table;
# a stage with too little time left is skipped and says so.
#
# What is written under $OUT (default ./gpu-out, ignored by git): session.log (everything printed),
# device.json, tests.tsv, ops.jsonl, engine.jsonl and engine.md (all written as they go), results.md (the
# targets, PASS/FAIL/UNMEASURED: collect_results.py, after every stage) and logs.tgz (build logs, junit
# XML, per-file test logs, the engine children's logs; repacked after every stage).
#
# Estimates on one H200 (16 cores), from the sizes: wheel install + build 60-100 s (three C++ files and one
# .cu against torch's headers, compiled in parallel by ninja); tests 120-200 s (about 970 tests; the cost is
# Triton compiling each kernel specialisation, about 0.5-1 s each, spread over nine processes); ops 90-150 s
# (60 timed cases at about 1 s each with do_bench and pytest-benchmark's rounds, plus 15 torch.compile'd
# references at about 5 s each); plans 30-60 s. Engine: each sidfast variant compiles three UNets forward and
# backward (2-5 min, side by side for all five), then nine rows are timed at a few seconds each.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/sidfast-gpu-work}
PY=${PYTHON:-python3}
BUDGET=360
DRY=0
RESERVE=20  # seconds kept for the final table and the log archive
STAGES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    -*) echo "gpu_session: unknown option $1" >&2; exit 2 ;;
    *) STAGES+=("$1") ;;
  esac
  shift
done
[ ${#STAGES[@]} -gt 0 ] || { echo "gpu_session: name at least one stage (see --help)" >&2; exit 2; }
for stage in "${STAGES[@]}"; do
  case "$stage" in build|build-any|tests|ops|plans|compile|engine) ;;
    *) echo "gpu_session: unknown stage $stage" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
DEADLINE=$((START + BUDGET))
left() { echo $((DEADLINE - RESERVE - $(date +%s))); }
# seconds each stage keeps for itself when an earlier stage of the same call sets its limit
declare -A MIN_S=([build]=0 [build-any]=0 [tests]=60 [ops]=120 [plans]=0 [compile]=0 [engine]=90)
limit_for() {  # $1: index of the stage in STAGES: what is left less what the later stages keep
  local i keep=0
  for ((i = $1 + 1; i < ${#STAGES[@]}; i++)); do keep=$((keep + ${MIN_S[${STAGES[$i]}]})); done
  echo $(( $(left) - keep ))
}
rm -rf "$WORK"  # a warm machine keeps the last call's logs: this call packs its own
mkdir -p "$WORK/junit" "$WORK/logs"
exec > >(tee -a "$OUT/session.log") 2>&1

# Test files: every ops test file, then the losses, the engine, LoRA and the trainer's CUDA paths.
# "name|pytest arguments"; the largest two are split over three xdist workers where xdist is installed.
TEST_PLAN=()
for f in tests/ops/test_*.py; do TEST_PLAN+=("$f|"); done  # every op: sid_loss, sida_loss, noise, ...
TEST_PLAN+=("tests/test_loss.py|" "tests/engine/test_engine.py|" "tests/engine/test_graphs.py|"
            "tests/models/test_lora.py|" "tests/models/test_lora_any.py|" "tests/models/test_discriminator.py|"
            "tests/training/test_train.py|-k cuda or gpu or engine")
[ -n "${SIDFAST_TESTS:-}" ] && IFS=';' read -r -a TEST_PLAN <<<"$SIDFAST_TESTS"  # e.g. a CPU dry run's subset
BUILD_S=${BUILD_S:-240}      # most one build may take
TEST_FILE_S=${TEST_FILE_S:-240}   # most one test file may take
TEST_CASE_S=${TEST_CASE_S:-200}   # most one test may take (pytest-timeout, where installed)

say() { echo "gpu_session [$(( $(date +%s) - START ))s] $*"; }
run() {  # run a command, or print it under --dry-run
  if [ "$DRY" = 1 ]; then echo "DRY-RUN: $*"; return 0; fi
  "$@"
}

pack() {  # the logs as one file under $OUT (files from $OUT are limited in number)
  [ "$DRY" = 1 ] && return 0
  tar czf "$OUT/logs.tgz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"
}

results() {  # the targets page from everything under $OUT so far
  [ "$DRY" = 1 ] && { echo "DRY-RUN: $PY benchmarks/collect_results.py $OUT --page $OUT/results.md"; return 0; }
  $PY benchmarks/collect_results.py "$OUT" --page "$OUT/results.md" || say "collect_results failed"
}

device_json() {  # device, driver, versions, build: what results pages are headed by
  [ "$DRY" = 1 ] && { echo "DRY-RUN: write $OUT/device.json"; return 0; }
  local smi nvcc_v
  smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
  nvcc_v=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -n 1)
  SMI="$smi" NVCC="$nvcc_v" BUILD="${BUILD_NOTE:-not built in this call}" $PY - "$OUT/device.json" <<'EOF'
import datetime, json, os, platform, sys
import torch
info = dict(date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(), torch=torch.__version__,
            cuda=torch.version.cuda, python=platform.python_version(), nvidia_smi=os.environ["SMI"] or None,
            nvcc=os.environ["NVCC"] or None, build=os.environ["BUILD"],
            name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA device)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                multiprocessors=p.multi_processor_count, driver=(os.environ["SMI"].split(", ") + ["", ""])[1] or None)
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    import sidfast.ops._native as n
    info["extension"] = "with CUDA" if n.WITH_CUDA else "CPU ops only"
except ImportError as exc:
    info["extension"] = f"not loadable: {exc}"
try:
    import diffusers
    info["diffusers"] = diffusers.__version__
except ImportError as exc:
    info["diffusers"] = f"missing ({exc}): put its wheels in .whl/ (benchmarks/fetch_wheels.sh)"
with open(sys.argv[1] + ".tmp", "w") as fh:
    json.dump(info, fh, indent=1)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print(json.dumps(info))
EOF
}

build() {  # $1: cuda (the CUDA extension, CPU ops if that fails) or cpu
  if [ "$1" = cuda ] && run timeout -k 10 "$BUILD_S" $PY -m pip install -q --no-build-isolation --no-deps -e . \
      >"$WORK/logs/build.log" 2>&1; then
    BUILD_NOTE="CUDA extension built"
    return 0
  fi
  if [ "$1" = cuda ]; then
    tail -n 30 "$WORK/logs/build.log"
    say "BUILD-WITHOUT-CUDA: the CUDA build failed (logs.tgz: logs/build.log); building the CPU ops only" \
        "(SIDFAST_NO_CUDA=1): the Triton kernels run, the native-CUDA tests skip"
  fi
  if SIDFAST_NO_CUDA=1 run $PY -m pip install -q --no-build-isolation --no-deps -e . >"$WORK/logs/build-cpu.log" 2>&1
  then
    BUILD_NOTE=$([ "$1" = cuda ] && echo "CUDA build FAILED (logs/build.log): CPU ops only" || echo "CPU ops only")
    return 0
  fi
  tail -n 60 "$WORK/logs/build-cpu.log"
  BUILD_NOTE="build FAILED (logs/build-cpu.log)"
  return 1
}

test_file() {  # one test file under its time limits; its line in tests.tsv when it ends
  local spec=$1 limit=$2 file args name t0 rc extra=()
  file=${spec%%|*}
  args=${spec#*|}
  name=$(basename "$file" .py)
  if $PY -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout "$TEST_CASE_S" --timeout-method signal); fi
  if [ "$name" = test_sid_loss ] || [ "$name" = test_fake_score_loss ]; then
    $PY -c "import xdist" 2>/dev/null && extra+=(-n 3)
  fi
  if [ -n "$args" ]; then extra+=(${args%% *} "${args#* }"); fi  # "-k EXPR": the option, then the expression
  t0=$(date +%s)
  if [ "$DRY" = 1 ]; then
    echo "DRY-RUN: timeout -k 10 $limit $PY -m pytest $file -v -p no:cacheprovider -rfEs --junitxml" \
         "$WORK/junit/$name.xml ${extra[*]}"
    return 0
  fi
  OMP_NUM_THREADS=2 timeout -k 10 "$limit" $PY -m pytest "$file" -v -p no:cacheprovider -rfEs \
    --junitxml "$WORK/junit/$name.xml" "${extra[@]}" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  $PY benchmarks/collect_results.py --test-line "$file" "$WORK/junit/$name.xml" "$WORK/logs/$name.log" \
    "$(( $(date +%s) - t0 ))" "$rc" "$limit" >>"$OUT/tests.tsv"
  say "$(tail -n 1 "$OUT/tests.tsv")"
}

stage_tests() {  # $1: time limit
  local limit=$1 pids=() spec
  [ "$limit" -gt "$TEST_FILE_S" ] && limit=$TEST_FILE_S
  [ "$limit" -lt 30 ] && { say "tests SKIPPED: ${limit}s left for them"; return 1; }
  printf '# plan: %s\n' "$(for spec in "${TEST_PLAN[@]}"; do printf '%s ' "${spec%%|*}"; done)" >>"$OUT/tests.tsv"
  say "tests: ${#TEST_PLAN[@]} files side by side, at most ${limit}s each"
  for spec in "${TEST_PLAN[@]}"; do
    test_file "$spec" "$limit" &
    pids+=($!)
  done
  wait "${pids[@]}"
  [ "$DRY" = 1 ] || awk -F'\t' '!/^#/ && ($3 > 0 || $4 > 0 || $7 != "ok") {bad = 1} END {exit bad}' "$OUT/tests.tsv"
}

bench() {  # $1: name for the logs, $2: time limit, then pytest arguments; rows reach $OUT/ops.jsonl as measured
  local name=$1 limit=$2
  shift 2
  [ "$limit" -lt 30 ] && { say "$name SKIPPED: ${limit}s left"; return 1; }
  say "$name: at most ${limit}s"
  export SIDFAST_BENCH_JSONL="$OUT/ops.jsonl"
  run timeout -k 10 "$limit" $PY -m pytest --benchmark-only -q \
    -p no:cacheprovider --benchmark-json "$WORK/$name.json" "$@" 2>&1 | tee "$WORK/logs/$name.log" | tail -n 25
  return "${PIPESTATUS[0]}"
}

say "stages: ${STAGES[*]}; budget ${BUDGET}s; results under $OUT, logs under $WORK"
if ls .whl/*.whl >/dev/null 2>&1; then  # diffusers (bench_engine.py, tests of the diffusers adapter)
  run $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || say "installing .whl/ failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
unset TRITON_INTERPRET  # compiled kernels on the GPU; tests/conftest.py sets it only where no CUDA device is seen
trap 'pack; results; [ "$DRY" = 1 ] || cat "$OUT/results.md" 2>/dev/null' EXIT

rc=0
for i in "${!STAGES[@]}"; do
  stage=${STAGES[$i]}
  limit=$(limit_for "$i")
  say "=== $stage (at most ${limit}s)"
  case "$stage" in
    build) build cuda; r=$?; device_json ;;
    build-any)
      if [ "$DRY" = 0 ] && $PY -c "import sidfast.ops._native" 2>/dev/null; then
        BUILD_NOTE="the build already on the machine"; r=0
      else
        build cpu; r=$?
      fi
      device_json ;;
    tests) stage_tests "$limit"; r=$? ;;
    ops) bench ops "$limit" benchmarks/bench_sid_loss.py benchmarks/bench_noise.py benchmarks/bench_fake_score_loss.py \
           -k "not op_plans"; r=$? ;;
    plans) bench plans "$limit" benchmarks/bench_sid_loss.py benchmarks/bench_host_overhead.py -k "op_plans or overhead"
           r=$? ;;
    compile)
      run timeout -k 10 "$limit" $PY benchmarks/compile_report.py \
        --arch "$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)')" \
        >"$WORK/logs/compile-report.txt" 2>&1
      r=$?; tail -n 20 "$WORK/logs/compile-report.txt" ;;
    engine)
      if [ "$limit" -lt 90 ]; then say "engine SKIPPED: ${limit}s left"; r=1
      else
        mkdir -p "$WORK/engine"
        run timeout -k 10 $((limit + 10)) $PY benchmarks/engine_session.py --out "$OUT/engine" --budget-s "$limit" \
          --log-dir "$WORK/engine" ${ENGINE_ARGS:-}
        r=$?
      fi ;;
  esac
  say "=== $stage: exit $r"
  [ "$r" -eq 0 ] || rc=$r
  pack
  results
done
exit "$rc"
