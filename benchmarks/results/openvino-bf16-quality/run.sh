#!/bin/bash
# bf16 against fp32 on the bundled model, n = 5000 (issue 31): benchmarks.quality's few-step rows (the same
# ddpm-generate commands, seed 0, classes cycling, batch 8) run by OpenVINO, each scored by ddpm-eval.
# The fp32 onnxruntime rows are in ../few-step-cpu-2core/rows.jsonl. Usage: bash run.sh OUT (about 40 min, 2 cores)
set -euo pipefail
OUT=${1:?usage: run.sh OUT}
B=$(dirname "$(command -v python3)")
[ -x .venv/bin/ddpm-generate ] && B=.venv/bin
row() {
  name=$1; shift
  [ -f "$OUT/$name.json" ] && return
  "$B/ddpm-generate" -n 5000 --batch-size 8 --format npz --out "$OUT/$name" --overwrite --no-model-defaults "$@"
  "$B/ddpm-eval" "$OUT/$name" --json > "$OUT/$name.json.tmp" && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
}
row ov-bf16-dpmpp-2m-10-logsnr --provider openvino --dtype bf16 --sampler dpmpp-2m --steps 10 --guidance 2.0 \
  --guidance-interval 0,400 --spacing logsnr
row ov-bf16-ddim-50 --provider openvino --dtype bf16 --sampler ddim --steps 50 --guidance 2.0 --guidance-interval 0,400
row ov-fp32-dpmpp-2m-10-logsnr --provider openvino --dtype fp32 --sampler dpmpp-2m --steps 10 --guidance 2.0 \
  --guidance-interval 0,400 --spacing logsnr
