#!/usr/bin/env bash
# Everything the GPU checks need, in as few device calls as possible (each call is limited to 10 minutes).
#
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]     results under $OUT (default ./gpu-out)
#
# Stages (each installs the package first; ninja rebuilds only what changed while the machine stays warm):
#   tests      the GPU-only tests (pytest -m gpu: compile, CUDA graphs, bf16, large sizes, native CUDA op)
#   compile    register and spill report of every kernel configuration (benchmarks/compile_report.py)
#   ops        the op benchmarks (pytest benchmarks/ --benchmark-only, without the whole-iteration ones) + table
#   engine:C:B whole SiD iterations, bench_engine.py for config C at batch sizes B (comma-separated),
#              e.g. engine:ddpm-cifar10:64  (the published eager loop side by side, fp32 and bf16). Each
#              sidfast row compiles its networks (minutes): give one or two batch sizes per call.
# Wheels in .whl/ (benchmarks/fetch_wheels.sh: diffusers) are installed first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  # e.g. an nvcc whose CUDA major version differs from torch's: keep the session useful with the CPU ops
  # (the Triton kernels do not need the extension's CUDA part); the native-CUDA tests then skip
  tail -n 40 "$OUT/build.log"
  echo "gpu_session: CUDA build failed (log: $OUT/build.log); building CPU ops only (SIDFAST_NO_CUDA=1)" \
    | tee "$OUT/BUILD-WITHOUT-CUDA.txt" >&2
  SIDFAST_NO_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build-cpu.log" 2>&1 \
    || { tail -n 60 "$OUT/build-cpu.log"; echo "gpu_session: build failed" >&2; exit 1; }
fi
$PY -c "import torch, sidfast._native as n; print('device', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| sidfast._C with CUDA:', n.WITH_CUDA)" \
  | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,power.draw --format=csv >>"$OUT/device.txt" 2>&1

rc=0
for stage in "$@"; do
  echo "=== $stage"
  case "$stage" in
    tests)
      $PY -m pytest tests -m gpu -q -p no:cacheprovider -rfEs --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
      r=${PIPESTATUS[0]} ;;
    compile)
      $PY benchmarks/compile_report.py --arch "$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)')" \
        2>&1 | tee "$OUT/compile-report.txt"
      r=${PIPESTATUS[0]} ;;
    ops)
      $PY -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider -k "not sid_iteration" \
        --benchmark-json "$OUT/ops.json" 2>&1 | tail -n 40
      r=${PIPESTATUS[0]}
      [ -f "$OUT/ops.json" ] && $PY benchmarks/report.py "$OUT/ops.json" -o "$OUT/ops.md" ;;
    engine:*)
      IFS=: read -r _ config batches <<<"$stage"
      # rows reach $OUT/engine_<config>.jsonl as they are measured (a call cut off at its limit keeps them)
      $PY benchmarks/bench_engine.py --config "$config" --batch ${batches//,/ } --out "$OUT/engine_$config" 2>&1
      r=$? ;;
    *) echo "gpu_session: unknown stage $stage" >&2; r=2 ;;
  esac
  [ "$r" -eq 0 ] || rc=$r
done
exit "$rc"
