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
# The model's error on the issue's rows (bf16, seq 4k, 16k tokens per batch = batch 4, heads =
# 2048 / D, non-causal): measured bidirlm ms vs the predicted_ms written beside it, and SDPA
# (flash) in the same run; paste the printed table into docs/perf-log.md with the date and card.
timeout 200 python -m bench.attention --head-dims 64,128,256 --seqlens 4096 --no-packed \
  > "$OUT/bench-targets.txt" 2>&1
python - "$OUT/results" > "$OUT/model-error.txt" 2>&1 <<'PY'
import json, pathlib, sys
rows = [json.loads(x) for f in pathlib.Path(sys.argv[1]).glob("*.jsonl")
        for x in f.read_text().splitlines() if x.strip()]
rows = [r for r in rows if r.get("suite") == "attention" and r.get("ms")]
print("| case | impl | pass | measured ms | TFLOP/s | predicted ms | model error |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if "4096" not in r["case"]:
        continue
    pred = (r.get("extra") or {}).get("predicted_ms")
    err = f"{100 * (pred / r['ms'] - 1):+.0f}%" if pred else ""
    tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
    print(f"| {r['case']} | {r['impl']} | {r['pass']} | {r['ms']:.3f} | {tf} | {pred or ''} | {err} |")
PY
tail -n 3 "$OUT"/*.txt
