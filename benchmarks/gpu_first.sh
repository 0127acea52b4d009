#!/usr/bin/env bash
# The first device call of a session that has the GPU (issue 7): steps 1, 2 and 4 of benchmarks/README.md
# ("What a session with the GPU runs first") in one call, so the 15 minutes of device time a task gets pay
# for one machine start only. Each step has its own time limit (together under the 10 minutes a call may
# run) and its own log under $OUT; one that runs over is cut off and the next still runs. Usage, from the
# repository root here, with the wheels of benchmarks/README.md in .whl:
#     device run, carry [".whl"], timeout_s 600:  bash benchmarks/gpu_first.sh
set -u
OUT=${OUT:?run it through the device tool, which sets OUT}
export FEATX_MODELS=$(mktemp -d)  # no export from an earlier call is measured
step() {  # step NAME SECONDS COMMAND...: run it, its output in $OUT/NAME.log, and say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout -k 10 "$limit" bash benchmarks/gpu_run.sh "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)"
    tail -n 25 "$OUT/$name.log"
}
step 1-gpu-tests 190 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 tests/
step 2-decode-stages 140 python3 benchmarks/decode_stages.py --device cuda --out "$OUT"
step 4-bench-resnet50 230 python3 -m featx bench --model resnet50 --weights none --device cuda --batch-sizes 256 \
    --compile default --n-images 8000 --out "$OUT"
