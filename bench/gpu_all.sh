#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a session that is lent a GPU machine (python3 there has torch):
# the GPU tests, the ranker's request latency, training throughput of the `paper` preset, TransAct V2's request
# latency, then batch-inference throughput of `paper` (bf16, torch.compile). Logs and JSON results go to $OUT (default /tmp/gpu-out), packed
# into $OUT/gpu-logs.tgz after every part, so a call stopped by its time limit still brings back what finished.
# Each benchmark process is stopped after $PART_TIMEOUT seconds (default 300), and none starts or runs past
# $DEADLINE seconds from the script's start (default 540: the device call's limit is 600), so the later processes
# still run and the archive is packed in time; the script exits 1 if any process failed or was stopped.
# Usage: bash bench/gpu_all.sh [tests|rank|v2|train|train-ro|train-mat|infer|infer-ro|infer-mat[:--extra,--args] ...]
# (-ro: compile mode reduce-overhead, i.e. CUDA graphs; -mat: max-autotune, Triton matmul templates + CUDA graphs)
# DEVICE=cpu runs the same parts at toy sizes on the CPU (a dry run of the script itself: tests/test_bench_scripts.py)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
FINAL=$OUT
OUT=$FINAL/logs  # packed into one archive at the end (the device tool brings back few files)
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
PART_TIMEOUT=${PART_TIMEOUT:-300}
DEADLINE=${DEADLINE:-540}
failed=0
parts=${*:-tests rank train-ro v2 infer train-mat infer-ro}
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
  RANK_SIZE=(--requests 64) V2_SIZE=(--reps 200 --warmup 10) TRAIN_SIZE=(--steps 30) INFER_SIZE=() BATCHES="256 1024" PRESET=paper
else  # toy sizes: this checks the script, not the machine
  RANK_SIZE=(--candidates 20 --seq-len 8 --items 500 --reps 3 --warmup 1 --train-steps 2 --batch 16 --requests 2)
  V2_SIZE=(--candidates 16 --length 256 --k 8 --reps 3 --warmup 1)
  TRAIN_SIZE=(--steps 2 --warmup 1 --workers 0) INFER_SIZE=(--users 64 --reps 1) BATCHES=32 PRESET=small
fi
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name() \
  if torch.cuda.is_available() else 'cpu')"
run() {  # one benchmark process, under the smaller of PART_TIMEOUT and the time left before DEADLINE
  local left=$((DEADLINE - SECONDS)) limit=$PART_TIMEOUT rc
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "skipped, ${left}s left before the deadline: $*"; failed=1; return; fi
  timeout -k 10 "$limit" "$@"; rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then echo "stopped at its ${limit}s limit: $*"; failed=1
  elif [ $rc != 0 ]; then echo "failed (exit $rc): $*"; failed=1; fi
}
pack() {  # to a temporary name, then renamed: a call stopped mid-pack still has the previous whole archive
  tar czf "$FINAL/.gpu-logs.tgz.tmp" -C "$OUT" . && mv "$FINAL/.gpu-logs.tgz.tmp" "$FINAL/gpu-logs.tgz"
}
for spec in $parts; do
  part=${spec%%:*}  # PART[:--extra,--args] passes the extra arguments to the benchmark
  extra=$([ "$spec" != "$part" ] && echo "${spec#*:}" | tr , ' ')
  tag=$(echo "$spec" | tr -c 'A-Za-z0-9_.\n-' _)
  case $part in *-ro) mode=reduce-overhead ;; *-mat) mode=max-autotune ;; *) mode=default ;; esac
  case $part in
    # (each process writes to its file and the file's end is shown after: `run` in a pipeline would be a subshell
    # and could not mark the call failed)
    tests) run python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
      tail -8 "$OUT/test_gpu.log" ;;
    rank)  # one request of 500 candidates (p99), and 64 requests per batch (rate): eager, then CUDA graphs
      run python3 bench/rank_latency.py --device "$DEVICE" --bf16 "${RANK_SIZE[@]}" $extra > "$OUT/$tag.json" 2>&1
      tail -1 "$OUT/$tag.json"
      run python3 bench/rank_latency.py --device "$DEVICE" --bf16 --compile --compile-mode reduce-overhead \
        "${RANK_SIZE[@]}" $extra > "$OUT/$tag-ro.json" 2>&1
      tail -1 "$OUT/$tag-ro.json" ;;
    v2)  # 1,000 candidates against 16,384 actions: selection alone per path (the naive / dedup ratio), then + model
      for p in naive dedup fused; do
        run python3 bench/v2_latency.py --device "$DEVICE" --path $p "${V2_SIZE[@]}" $extra > "$OUT/$tag-$p.json" 2>&1
        tail -1 "$OUT/$tag-$p.json"
      done
      for p in dedup fused; do
        run python3 bench/v2_latency.py --device "$DEVICE" --path $p --model --bf16 "${V2_SIZE[@]}" $extra \
          > "$OUT/$tag-$p-model.json" 2>&1
        tail -1 "$OUT/$tag-$p-model.json"; done ;;
    train|train-ro|train-mat)  # compiled encoder + fused loss
      run python3 bench/train_throughput.py --preset $PRESET --device "$DEVICE" --compile --compile-mode $mode \
        --reference "${TRAIN_SIZE[@]}" --profile "$OUT/$tag-profile.txt" $extra > "$OUT/$tag.json" 2>&1
      tail -40 "$OUT/$tag.json" ;;
    infer|infer-ro|infer-mat)
      for b in $BATCHES; do
        run python3 bench/batch_inference.py --preset $PRESET --device "$DEVICE" --compile --compile-mode $mode \
          --batch-size $b "${INFER_SIZE[@]}" --reference --profile "$OUT/$tag-b$b-profile.txt" $extra \
          > "$OUT/$tag-b$b.json" 2>&1
        tail -40 "$OUT/$tag-b$b.json"; done ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  pack  # after every part: a stopped call still brings back what finished
done
rm -rf "$OUT"
exit $failed
