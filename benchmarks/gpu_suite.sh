#!/usr/bin/env bash
# The GPU run, in one call of the device tool: bash benchmarks/gpu_suite.sh [--dry-run] [--only STEP,...]
#
# Runs from the repository root on a machine with one CUDA GPU and no network, as the device tool runs commands
# there (the checkout on PYTHONPATH, python3). Steps, in order of value, each time-boxed so one hang loses only itself:
#   export   the bundled checkpoint to .pt2 for cuda, fp32 and bf16, each verified on the GPU (ddpm-export)
#   loop     img-steps/s at batch 64 and 2048: eager-cuda, compile-cuda, pt2-cuda, pt2-cuda-bf16 (benchmarks.throughput)
#   e2e      1000 images, --format npz, at DDPM-1000, DDIM-50 and the model's recommended few-step settings, on the
#            best backend (the bf16 .pt2's device loop; the fp32 one if bf16 did not export)
#   serve    benchmarks.serve, uniform workload at 64 clients, batching against one at a time (needs the server's
#            packages: carried as wheels in .whl/, see benchmarks/gpu_wheels.sh)
#   ort      onnxruntime CUDA rows (onnx-cuda, onnx-cuda-fused) where onnxruntime-gpu is importable
# Everything it brings back is under $OUT, in at most 3 files: summary.txt (one line a step: status, seconds),
# results.tar.gz (every result and log) and e2e.tar.gz (the run folders, for ddpm-eval here). A step whose time box
# would end past BUDGET_S (default 480 s) from the start is skipped, saying so.
#
# --dry-run: here, on the CPU: says what each step would run and with which time box, checks that every command line
# parses (each module's --help with the same arguments), runs no CUDA step, and packs $OUT as the real run does.
set -u -o pipefail

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (expected --dry-run, --only STEP,...)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-480}
WORK=$(mktemp -d)
CKPT=runtime/assets/fashion-mnist.ckpt
export PYTHONPATH="${EXTRA_SITE:+$EXTRA_SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK/results"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
BOXES=0

say() { echo "$*" | tee -a "$SUMMARY" >&2; }

# run NAME LIMIT_S CMD...: CMD under a time box, its output in results/NAME.log; one summary line
run() {
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && ! [[ ",$ONLY," == *",${name%%-*},"* ]]; then
    return 0
  fi
  if [ "$DRY" = 0 ] && [ $((SECONDS + limit)) -gt "$BUDGET_S" ]; then
    say "$name: skipped (${SECONDS} s spent: its ${limit} s box would pass the ${BUDGET_S} s budget)"
    return 0
  fi
  BOXES=$((BOXES + limit))
  if [ "$DRY" = 1 ]; then
    if "$@" --help > "$WORK/results/$name.help" 2>&1; then
      say "$name: would run (<= ${limit} s): $*"
    else
      say "$name: FAILS TO PARSE: $* ($(tail -1 "$WORK/results/$name.help"))"
      FAILED=1
    fi
    return 0
  fi
  local start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" > "$WORK/results/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  case $rc in
    0) say "$name: ok in ${took} s" ;;
    124|137) say "$name: TIMED OUT after ${took} s (box ${limit} s)"; FAILED=1 ;;
    *) say "$name: FAILED (exit $rc) in ${took} s: $(tail -1 "$WORK/results/$name.log")"; FAILED=1 ;;
  esac
  return $rc
}

FAILED=0
say "gpu_suite: $(date -u +%FT%TZ), $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1 | tail -1)"
if [ "$DRY" = 0 ] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "gpu_suite: torch sees no CUDA device here; use --dry-run on a machine without one"
  exit 2
fi

# 1. export: .pt2 for cuda, fp32 and bf16, verified there
run export-fp32 120 $PY -m ddpm_export.cli "$CKPT" --format pt2 --device cuda --dtype fp32 --out "$WORK/model.pt2"
run export-bf16 120 $PY -m ddpm_export.cli "$CKPT" --format pt2 --device cuda --dtype bf16 --out "$WORK/model.bf16.pt2"
for f in model.pt2 model.bf16.pt2; do
  [ -f "$WORK/$f.report.json" ] && cp "$WORK/$f.report.json" "$WORK/results/"
done

# 2. loop: the PyTorch user's loop against ours
run loop 150 $PY -m benchmarks.throughput --checkpoint "$CKPT" --backends eager-cuda,compile-cuda,pt2-cuda,pt2-cuda-bf16 \
  --batch-sizes 64,2048 --out "$WORK/results/throughput"

# 3. e2e: 1000 images on the best backend
BEST="$WORK/model.bf16.pt2"
if [ "$DRY" = 0 ] && [ ! -f "$BEST" ]; then BEST="$WORK/model.pt2"; fi
E2E="$WORK/e2e"
mkdir -p "$E2E"
run e2e-ddpm1000 90 $PY -m runtime.generate_cli "$BEST" -n 1000 --batch-size 1000 --sampler ddpm --steps 1000 \
  --format npz --out "$E2E/ddpm-1000"
run e2e-ddim50 40 $PY -m runtime.generate_cli "$BEST" -n 1000 --batch-size 1000 --sampler ddim --steps 50 \
  --format npz --out "$E2E/ddim-50"
run e2e-recommended 40 $PY -m runtime.generate_cli "$BEST" -n 1000 --batch-size 1000 --format npz \
  --out "$E2E/recommended"

# 4. serve: batching against one at a time, uniform workload, 64 clients (the server's packages from .whl/ if missing)
if [ "$DRY" = 0 ] && ! $PY -c 'import fastapi, uvicorn' 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
run serve 100 $PY -m benchmarks.serve --model "$BEST" --clients 64 --workloads uniform --seconds 20 --max-batch 256 \
  --out "$WORK/results/serve"

# 5. ort: onnxruntime's CUDA provider, where onnxruntime-gpu is there
if [ "$DRY" = 1 ] || $PY -c 'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' 2>/dev/null; then
  run ort 120 $PY -m benchmarks.throughput --checkpoint "$CKPT" --backends onnx-cuda,onnx-cuda-fused \
    --batch-sizes 64,2048 --out "$WORK/results/throughput-ort"
else
  say "ort: skipped (onnxruntime has no CUDAExecutionProvider here)"
fi

# what comes back: summary.txt, results.tar.gz, e2e.tar.gz
tar -C "$WORK" -czf "$OUT/results.tar.gz" results
tar -C "$WORK" -czf "$OUT/e2e.tar.gz" e2e
rm -rf "$WORK"
say "gpu_suite: done in ${SECONDS} s (time boxes of the steps run: ${BOXES} s); $( [ "$FAILED" = 0 ] && echo "every step ok" || echo "some steps failed" )"
exit "$FAILED"
