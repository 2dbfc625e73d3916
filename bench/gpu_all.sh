#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a session that is lent a GPU machine (python3 there has torch):
# the GPU tests, then training and batch-inference throughput of the `paper` preset in bf16 with torch.compile.
# Logs and JSON results go to $OUT (default /tmp/gpu-out).
# Usage: bash bench/gpu_all.sh [tests|train|train-ro|train-mat|infer|infer-ro|infer-mat[:--extra,--args] ...]
# (-ro: compile mode reduce-overhead, i.e. CUDA graphs; -mat: max-autotune, Triton matmul templates + CUDA graphs)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
FINAL=$OUT
OUT=$FINAL/logs  # packed into one archive at the end (the device tool brings back few files)
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
parts=${*:-tests train-ro infer train-mat infer-ro}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
for spec in $parts; do
  part=${spec%%:*}  # PART[:--extra,--args] passes the extra arguments to the benchmark
  extra=$([ "$spec" != "$part" ] && echo "${spec#*:}" | tr , ' ')
  tag=$(echo "$spec" | tr -c 'A-Za-z0-9_.\n-' _)
  case $part in *-ro) mode=reduce-overhead ;; *-mat) mode=max-autotune ;; *) mode=default ;; esac
  case $part in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -8 ;;
    train|train-ro|train-mat)  # compiled encoder + fused loss
      python3 bench/train_throughput.py --preset paper --device cuda --compile --compile-mode $mode --reference \
        --steps 30 --profile "$OUT/$tag-profile.txt" $extra 2>&1 | tee "$OUT/$tag.json" ;;
    infer|infer-ro|infer-mat)
      for b in 256 1024; do
        python3 bench/batch_inference.py --preset paper --device cuda --compile --compile-mode $mode --batch-size $b \
          --reference --profile "$OUT/$tag-b$b-profile.txt" $extra 2>&1 | tee "$OUT/$tag-b$b.json"; done ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
tar czf "$FINAL/gpu-logs.tgz" -C "$OUT" . && rm -rf "$OUT"
