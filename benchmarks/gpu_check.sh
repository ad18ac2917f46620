#!/usr/bin/env bash
# The CUDA path end to end on one GPU, for the day a GPU is lent (it has not run yet: no GPU has been lent to
# this project).  Under 8 minutes on one H100/H200-class GPU by design; writes $OUT/gpu_check.json and
# $OUT/gpu_check.md (OUT defaults to benchmarks/results/gpu).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
declare -A STATUS SECONDS_TAKEN
step() {  # step NAME COMMAND...: run, time, keep going on failure
  local name=$1; shift
  local t0=$(date +%s.%N)
  if "$@" >"$WORK/$name.log" 2>&1; then STATUS[$name]=ok; else STATUS[$name]="failed (rc $?)"; tail -20 "$WORK/$name.log"; fi
  SECONDS_TAKEN[$name]=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
  echo "$name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s"
}
SMOL="--nsamples 32 --seqlen 512 --eval wiki-test,news --device cuda --dtype bfloat16"
step smollm2_in_memory svdllm -q compress smollm2-135m $SMOL --out "$WORK/mem"
step smollm2_low_memory svdllm -q compress smollm2-135m $SMOL --low-memory --out "$WORK/low"
step same_model python3 - "$WORK/mem" "$WORK/low" <<'PY'
import json, sys
a, b = (json.load(open(f"{d}/svdllm_report.json")) for d in sys.argv[1:])
assert a["plan"]["ranks"] == b["plan"]["ranks"], "ranks differ"
for k, v in a["perplexity"]["compressed"].items():
    assert abs(b["perplexity"]["compressed"][k] / v - 1) < 1e-3, (k, v, b["perplexity"]["compressed"][k])
print("same ranks, perplexity within 0.1%")
PY
step scale_7b_blocks python3 benchmarks/scale.py --blocks 1,2 --nsamples 8 --seqlen 256 --results "$OUT/scale" --work "$WORK/scale"
step cost_default python3 benchmarks/cost.py --ratios 0.2 --device cuda --results "$OUT/cost"
step bench_fast svdllm bench "$WORK/mem" --dense smollm2-135m --fast --device cuda --json "$WORK/bench.json"
step quantized_int4 svdllm -q quantize "$WORK/mem" --bits 4 --device cuda --out "$WORK/q4"
step quantized_eval svdllm -q eval "$WORK/q4" --device cuda --data wiki-test
step torchrun_nccl torchrun --standalone --nproc-per-node 1 -m svdllm -q compress smollm2-135m --device cuda \
  --nsamples 8 --seqlen 256 --eval wiki-test --max-tokens 2048 --out "$WORK/dist"
python3 - "$OUT" "$WORK" <<PY
import json, sys, pathlib
out, work = map(pathlib.Path, sys.argv[1:])
status = {$(for k in "${!STATUS[@]}"; do printf '"%s": ["%s", %s], ' "$k" "${STATUS[$k]}" "${SECONDS_TAKEN[$k]}"; done)}
extra = {}
for name in ("mem", "low", "dist"):
    f = work / name / "svdllm_report.json"
    if f.exists():
        r = json.loads(f.read_text()); extra[name] = {"perplexity": r["perplexity"], "timings": r["timings"]}
if (work / "bench.json").exists():
    extra["bench"] = json.loads((work / "bench.json").read_text())
(out / "gpu_check.json").write_text(json.dumps({"steps": status, "results": extra}, indent=2))
rows = "\n".join(f"| {k} | {v[0]} | {v[1]} |" for k, v in status.items())
(out / "gpu_check.md").write_text("| step | status | seconds |\n|---|---|---:|\n" + rows + "\n")
print((out / "gpu_check.md").read_text())
PY
