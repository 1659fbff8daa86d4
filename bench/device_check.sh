#!/usr/bin/env bash
# The GPU check of issue 7 on one H100 or H200, in under 10 minutes (about 4 on an H100):
# bench/gpu_throughput.py for the pythia-410m- and pythia-1.4b-shaped models, UnitedLLM's local
# round beside a plain Hugging Face Trainer + PEFT run (tokens/s, ratio, peak memory, MFU).
#
#   bash bench/device_check.sh        # from the repository root; results go to $OUT (else bench/out)
#
# Writes environment.txt (nvidia-smi, versions), gpu_throughput.json/.log, and pytest_gpu.log
# from the GPU-only tests (tests that skip without CUDA; there is no gpu marker), and serving.json/.log
# (bench/serving.py --engine-only: our serving engine vs sequential generate and vLLM, where installed).
#
# The device image has python3 with torch, transformers, peft, accelerate, tokenizers, PyYAML
# and rich, but not msgspec, datasets, dill or multiprocess: when .whl/ holds wheels for them
# (bench/RESULTS.md says how to fetch them) they are installed into a scratch folder first,
# and UnitedLLM itself is used from src/ (nothing is installed into the image).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/unitedllm-device-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "device_check: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi || true
    "$PYTHON" -c 'import sys, torch, transformers, peft, datasets, msgspec, unitedllm
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__, "datasets", datasets.__version__,
      "msgspec", msgspec.__version__, "unitedllm", unitedllm.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
} >"$OUT/environment.txt" 2>&1
status=$?
cat "$OUT/environment.txt"
if [ "$status" -ne 0 ]; then
    echo "device_check: the Python environment is incomplete (see above); nothing was measured" >&2
    exit 1
fi

timeout 480 "$PYTHON" bench/gpu_throughput.py --out "$OUT/gpu_throughput.json" 2>&1 | tee "$OUT/gpu_throughput.log"
bench_status=${PIPESTATUS[0]}
# The GPU-only tests (skipped on CPU machines): the aggregator evaluates on the GPU.
timeout 120 "$PYTHON" -m pytest tests/test_silo_precision.py -k gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
test_status=${PIPESTATUS[0]}
# Serving: the transformers engine (dynamic batching, LoRA) vs sequential generate and, where vLLM
# is installed, vLLM on the same pythia-160m-shaped model, adapter and prompts (tokens/s).
timeout 180 "$PYTHON" bench/serving.py --engine-only --shape pythia-160m --requests 32 --max-tokens 64 \
    --levels 1,8,32 --out "$OUT/serving.json" 2>&1 | tee "$OUT/serving.log"
serving_status=${PIPESTATUS[0]}
echo "device_check: bench exit $bench_status, GPU tests exit $test_status, serving exit $serving_status"
[ "$bench_status" -eq 0 ] && [ "$test_status" -eq 0 ] && [ "$serving_status" -eq 0 ]
