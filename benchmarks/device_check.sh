#!/usr/bin/env bash
# The GPU check, on a fresh GPU machine, in under 8 minutes: set up the project, then benchmarks/device_check.py
# (correctness of every variant on the GPU against float64 on the CPU, then ViT-S/16 and ViT-B/16 timings, bf16,
# eager and torch.compile, peak memory). Arguments go to device_check.py; the defaults are the full GPU run:
#
#   bash benchmarks/device_check.sh                      # results in benchmarks/results/device_check/
#   bash benchmarks/device_check.sh --out "$OUT"         # on the lent device machine: the files come back
#   bash benchmarks/device_check.sh --device cpu --quick --compile-backend aot_eager --out /tmp/dc   # the tests
#
# Setup: nothing is downloaded (the machine may have no network). Python packages missing there can travel as
# wheels in .whl/ (installed into /tmp/site first); the project itself runs from this checkout (PYTHONPATH).
# Exit status: 0 all correctness checks passed, 1 one failed (results written all the same), 2 no GPU,
# 3 a package is missing, 124 the run outlived DEVICE_CHECK_TIMEOUT (default 470 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LIMIT="${DEVICE_CHECK_TIMEOUT:-470}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
    echo "device_check.sh: installing the carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF' || exit 3
import importlib.util, sys
need = ["torch", "timm", "safetensors", "numpy", "huggingface_hub"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    print(f"device_check.sh: missing Python packages: {', '.join(missing)} (carry them as wheels in .whl/)",
          file=sys.stderr)
    sys.exit(3)
import torch, timm, vit2cbsa
print(f"device_check.sh: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.is_available()}), timm {timm.__version__}, vit2cbsa {vit2cbsa.__version__} from {vit2cbsa.__file__}")
PYEOF
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
status=0
timeout -k 15 "$LIMIT" "$PY" benchmarks/device_check.py "$@" || status=$?
exit "$status"
