#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a GPU host whose python3 has torch and transformers but not the
# rest of Loom's packages. Make the wheels first, where pip works: `bash benchmarks/gpu_wheels.sh` (into .whl/).
# With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600);
# the JSON and the log come back from $OUT. About 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu_check.log"
timeout "${GPU_CHECK_SECONDS:-540}" python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 \
    | tee -a "$OUT/gpu_check.log"
