#!/bin/bash
# The GPU check in one command, for a lent GPU machine (Python 3.12 with CUDA torch, no network):
# installs the wheels bench/gpu_wheels.sh prepared in .whl/, runs the gpu tests (75 s at most) and
# bench/gpu.py on the production htdemucs architecture (a 170 s budget, stopped at 210 s), and leaves
# card.txt, pytest.log, bench.log and gpu.json in $OUT (bench/results/ without it). About 5 minutes,
# so that a 15-minute lease holds the machine's start, this run and one rerun. With the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=330)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
export PYTHONPATH=/tmp/site:$PWD/shared/src:$PWD/services/separator/src:$PWD/dev PYTHONUNBUFFERED=1
echo "commit $(cat .whl/COMMIT 2>/dev/null || echo unknown)" | tee "$OUT/card.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1 | tee -a "$OUT/card.txt"
python3 -c "import torch, separator.device, separator.stream, stemflow_dev.models; print('torch', torch.__version__)" ||
    exit 1

status=0
# --noconftest: the repository's conftest needs the integration-test stack; test_gpu.py needs none of it.
# Only the gpu-marked tests: the file's CPU tests run in CI.
timeout 75 python3 -m pytest services/separator/tests/test_gpu.py --noconftest -m gpu -q -rs 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 210 python3 bench/gpu.py --device cuda --model production --budget-s 170 --out "$OUT/gpu.json" 2>&1 |
    tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
