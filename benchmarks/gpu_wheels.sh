#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh, into .whl/ (ignored by git): the packages Loom's training path needs that a
# GPU image with torch and transformers lacks, at the versions of this environment, for the GPU host's Python
# (3.12 unless PYTHON_VERSION says otherwise). DeepSpeed ships only a source archive: it is built here as a
# pure-Python wheel (its ops compile on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON_VERSION:-3.12}"
version() { python3 -m pip show "$1" | sed -n 's/^Version: //p'; }
mkdir -p .whl
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "megatron-core==$(version megatron-core)" "webdataset==$(version webdataset)" "braceexpand==$(version braceexpand)" \
    "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
du -sh .whl && ls .whl
