#!/usr/bin/env bash
# The seed's full recipe (25 frozen + 35 fine-tuning epochs) on one GPU, from the packed data of
# pack.py, then the figures issue 7 asks for: training and evaluation images/s and wall time.
#   DATA=.device-data RUN=/tmp/gpu-run bash benchmarks/gpu_recipe/run.sh [extra train flags]
# Extra flags go to `melanoma train` (e.g. --max-steps-per-epoch 2 --device cpu for a smoke run).
set -euo pipefail
DATA=${DATA:-.device-data}
RUN=${RUN:-/tmp/gpu-run}
BACKBONE=${BACKBONE:-tf_efficientnet_lite2}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
PY=${PY:-python3}
rm -rf "$RUN"
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
start=$(date +%s)
$PY -m melanoma_detector train --config configs/gpu.yaml \
    --data "$DATA/ham10000" --data "$DATA/isic2017" --split-file configs/splits/default.csv \
    --backbone "$BACKBONE" --weights "$DATA/$BACKBONE.safetensors" \
    --cache-dir /tmp/melanoma-cache --out "$RUN" --no-progress "$@"
end=$(date +%s)
$PY benchmarks/gpu_recipe/report.py "$RUN" --wall "$((end - start))" --workers "${REPORT_WORKERS:-12}"
