#!/usr/bin/env bash
# GPU smoke test (bench/gpu_smoke.py): sft in bf16 on the GPU, MFU, tokens/s and peak memory against `rlhf plan`.
#   bash bench/gpu_smoke.sh [gpu_smoke.py arguments]
#   bash bench/gpu_smoke.sh --qlora [gpu_qlora.py arguments]
# On a machine without this project's dependencies, put wheels in .whl/ first (pydantic and its needs):
# they are installed into /tmp/site. Results go to $OUT/gpu_smoke.jsonl (or ./gpu_smoke.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "${1:-}" = "--qlora" ]; then  # QLoRA instead (bench/gpu_qlora.py): needs bitsandbytes (its wheel in .whl/)
  shift
  python3 bench/gpu_qlora.py --out "${OUT:-.}" "$@"
else
  python3 bench/gpu_smoke.py --out "${OUT:-.}" "$@"
fi
