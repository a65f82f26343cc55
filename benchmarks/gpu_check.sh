#!/bin/bash
# The GPU device check, as one script for a lent GPU machine (python3 there holds torch):
# the throughput benchmark with and without bf16/torch.compile, then the query-efficiency sweep,
# three seeds in parallel (each a separate process; the models are small and launch-bound).
# Needs wheels for the packages the GPU image lacks in .whl/ and the demo's teacher and generator
# in runs/demo/. Results go to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 170 python3 benchmarks/distill_throughput.py --device cuda --steps 20 --reps 5 --pipeline-steps 200 \
    --json "$OUT/paper-mnist-gpu.json" > "$OUT/qe.log" 2>&1
cat "$OUT/qe.log"
for s in 0 1 2; do
  timeout 360 python3 benchmarks/query_efficiency.py --seeds $s --set device=cuda --out runs/qe \
      --csv "runs/csv/qe-default-s$s.csv" >> "$OUT/qe.log" 2>&1 &
done
for s in 0 1 2; do
  timeout 360 python3 benchmarks/query_efficiency.py --seeds $s --budgets 50000 100000 --set device=cuda distill.epochs=20 \
      --variant epochs20 --out runs/qe --csv "runs/csv/qe-epochs20-s$s.csv" >> "$OUT/qe.log" 2>&1 &
done
wait
awk 'FNR > 1 || NR == 1' runs/csv/*.csv > "$OUT/query-efficiency-gpu.csv"
grep -v "queries ━" "$OUT/qe.log" | tail -n 60
