#!/usr/bin/env bash
# One device call for a session that is lent a GPU (H100/H200): kernel tests on the GPU (bf16
# cases included), then every benchmark suite, with all output under $OUT (the device tool brings
# back up to 8 files). The GPU machine has torch/triton/transformers preinstalled and no package
# registry, so bidirlm is put on the path instead of pip-installed.
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
set -uo pipefail
OUT="${OUT:-/tmp/bidirlm-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" BIDIRLM_BENCH_RESULTS="$OUT/results"
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -m bidirlm env
} > "$OUT/env.txt" 2>&1
timeout 240 python -m pytest -q -x tests/test_attention.py tests/test_mntp_loss.py \
  tests/test_infonce.py tests/models/test_models.py > "$OUT/tests.txt" 2>&1
echo "tests rc $?" >> "$OUT/tests.txt"
for suite in attention mntp_loss infonce model; do
  timeout 300 python -m "bench.$suite" > "$OUT/bench-$suite.txt" 2>&1
  echo "rc $?" >> "$OUT/bench-$suite.txt"
done
tail -n 3 "$OUT"/*.txt
