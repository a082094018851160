#!/usr/bin/env bash
# The seed's full recipe (25 frozen + 35 fine-tuning epochs) on one GPU, from the packed data of
# pack.py, then the figures issue 7 asks for: training and evaluation images/s and wall time.
#   DATA=.device-data RUN=/tmp/gpu-run bash benchmarks/gpu_recipe/run.sh [extra train flags]
# Extra flags go to `melanoma train` (e.g. --max-steps-per-epoch 2 --device cpu for a smoke run).
# Training stops (Ctrl-C, resumable) after TRAIN_LIMIT seconds, 480 by default, so that the report
# still runs inside the device tool's 10 minutes a command; the report (report.json, metrics.csv)
# goes to $OUT, the folder the device tool brings back, when it is set. Continue a stopped run with
# `python -m melanoma_detector train --resume $RUN` (run.sh itself starts afresh).
set -uo pipefail
DATA=${DATA:-.device-data}
RUN=${RUN:-/tmp/gpu-run}
SPLIT=${SPLIT:-$DATA/split.csv}  # pack.py's: the committed split's rows for the packed images
BACKBONE=${BACKBONE:-tf_efficientnet_lite2}
REPORT=${OUT:-$RUN}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
PY=${PY:-python3}
rm -rf "$RUN"
mkdir -p "$REPORT"
if compgen -G "$DATA.shard-*" > /dev/null; then  # packs carried over several calls (pack.py --shard)
  mkdir -p "$DATA" && for shard in "$DATA".shard-*; do cp -r "$shard"/. "$DATA"/; done
  echo "merged $(ls -d "$DATA".shard-* | wc -l) shards into $DATA"
fi
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
start=$(date +%s)
timeout --signal=INT --kill-after=30 "${TRAIN_LIMIT:-480}" \
  $PY -m melanoma_detector train --config configs/gpu.yaml \
    --data "$DATA/ham10000" --data "$DATA/isic2017" --split-file "$SPLIT" \
    --backbone "$BACKBONE" --weights "$DATA/$BACKBONE.safetensors" \
    --cache-dir /tmp/melanoma-cache --out "$RUN" --no-progress "$@"
status=$?
end=$(date +%s)
echo "train exit status $status after $((end - start)) s"
# 124: stopped by TRAIN_LIMIT, as planned (the device tool would read 124 as its own time-out)
if [ "$status" -eq 124 ]; then echo "stopped at TRAIN_LIMIT; continue with: $PY -m melanoma_detector train --resume $RUN"; status=0; fi
$PY benchmarks/gpu_recipe/report.py "$RUN" --wall "$((end - start))" --workers "${REPORT_WORKERS:-12}" \
  --json "$REPORT/report.json"
cp "$RUN/metrics.csv" "$REPORT/metrics.csv" 2>/dev/null || true
exit "$status"
