#!/usr/bin/env bash
# The CUDA path end to end on an NVIDIA machine: the decode-graph unit tests on CUDA, the
# engine's decode steps as CUDA graphs against --enforce-eager (bench/engine_steps.py), the
# benchmark with --device cuda, and the integration suite (the real bundled model through
# the real HTTP app; the server's --device auto picks CUDA there). Everything lands in OUT
# (default bench/results/cuda), seven files: the GPU's description with the unit tests'
# log, the logs and the benches' result files.
#
#   bench/cuda_check.sh [OUT] [TEST_SECONDS] [BENCH_SECONDS]
#
# It expects textmill importable by `python3` (an install, or PYTHONPATH=.) and the bundled
# model installed; tests that need optional packages (schemathesis, Ray, a browser, the
# Gemma file) are left out, as they say nothing about the device.
set -u
OUT=${1:-bench/results/cuda}
TEST_S=${2:-300}
BENCH_S=${3:-240}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null; nproc; } >"$OUT/unit.log" 2>&1
cat "$OUT/unit.log"

# bench/servers.py starts .venv/bin/textmill and .venv/bin/python: give it this python.
if [ ! -x .venv/bin/textmill ]; then
  mkdir -p .venv/bin
  ln -sf "$(command -v $PY)" .venv/bin/python
  printf '#!/bin/sh\nexec %s -m textmill.cli "$@"\n' "$(command -v $PY)" >.venv/bin/textmill
  chmod +x .venv/bin/textmill
fi

echo "== unit tests on CUDA (decode graphs against eager CUDA)"
timeout 120 $PY -m pytest tests/unit/test_decode_graphs.py -q -rfEs -p no:cacheprovider >>"$OUT/unit.log" 2>&1
echo "unit exit $?"; tail -n 15 "$OUT/unit.log"

# Decode steps as CUDA graphs (the default) against --enforce-eager, both engines in one
# process taking turns: the ratio without HTTP.
echo "== engine steps, graphs against eager"
timeout "$BENCH_S" $PY bench/engine_steps.py --variants " --device cuda" " --device cuda --enforce-eager" \
  --concurrency 1 16 64 --repeats 2 --json "$OUT/engine.json" >"$OUT/engine.log" 2>&1
echo "engine exit $?"; tail -n 12 "$OUT/engine.log"

echo "== bench, --device cuda"
timeout "$BENCH_S" $PY bench/run.py --models smollm2 synthetic-1b --systems textmill --quick \
  --concurrency 1 16 64 --wait-quiet 0 --textmill-args "--device cuda" --json "$OUT/bench.json" \
  >"$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -n 40 "$OUT/bench.log"
for f in bench/results/logs/textmill-*.log; do echo "== $f"; tail -n 30 "$f"; done >"$OUT/server-logs.txt" 2>&1

echo "== integration suite on CUDA"
timeout "$TEST_S" $PY -m pytest tests/integration -q -rfE -p no:cacheprovider --timeout 120 \
  --ignore=tests/integration/test_ray_serve.py --ignore=tests/integration/test_ops_schema.py >"$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -n 60 "$OUT/tests.log"
