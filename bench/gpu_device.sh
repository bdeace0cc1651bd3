#!/usr/bin/env bash
# The whole GPU check of issue 30 as one command on the device machine (one short lease, so one call):
#
#   on the CPU first:  bench/gpu_wheels.sh --with-bitsandbytes     (the wheels the device image lacks)
#   on the device:     bash bench/gpu_device.sh [DEADLINE_SECONDS]  (with bench/out/wheels carried)
#
# 1. installs the carried wheels; names the device, the driver and the package versions;
# 2. the CUDA-relevant tests (precision choice, the LM loss kernels, packing, host syncs, decoder generation and the
#    methods, quantized ones included) in the background, while bench/gpu_smoke.py runs the CLI end to end (train +
#    evaluate bf16, QLoRA, grid --jobs 2 on the one GPU, the host-sync count);
# 3. `python -m bench.gpu` (8B/1B shapes, ftctl vs plain transformers + peft in the same run, plan vs measured),
#    starting no scenario after the deadline, so the results are written before the lease ends.
# Everything comes back under $OUT (at most 8 files): device.log, pytest.log, perf_gpu.{md,json}, gpu_smoke.json,
# RESULTS.md and logs.tar.gz (every row's log and run.json).
# GPU_BENCH_ARGS adds options to bench.gpu (a CPU rehearsal: GPU_BENCH_ARGS="--shape tiny --only 8b_lora").
set -u
deadline=${1:-450}
start=$(date +%s)
out=${OUT:-bench/out/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
left() { echo $((deadline - ($(date +%s) - start))); }
{
echo "== install ($(date -u +%T))"
python3 -m pip install -q --no-deps --no-index --no-cache-dir bench/out/wheels/*.whl 2>&1 | tail -3 || true
if ! python3 -c "import pydantic, datasets, bitsandbytes" || ! command -v ftctl >/dev/null; then  # a read-only image
    python3 -m pip install -q --no-deps --no-index --no-cache-dir --target /tmp/site bench/out/wheels/*.whl
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate, bitsandbytes, datasets, launch.cli; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__, 'datasets', datasets.__version__, 'flash_attn', __import__('importlib').util.find_spec('flash_attn') is not None)"
echo "== tests (background) + smoke ($(date -u +%T), $(left) s left)"
OMP_NUM_THREADS=2 timeout 200 python3 -m pytest -n 6 -q --timeout 150 \
    tests/gpu tests/run/test_precision.py tests/run/test_lm_loss.py tests/tasks/test_packing.py tests/run/test_step_syncs.py \
    tests/run/test_llm.py tests/methods/test_methods.py tests/methods/test_method_details.py \
    > "$out/pytest.log" 2>&1 &
tests=$!
timeout 240 python3 -m bench.gpu_smoke
wait $tests; echo "tests exit $?: $(tail -1 "$out/pytest.log")"
echo "== bench ($(date -u +%T), $(left) s left)"
budget=$(( $(left) - 150 ))
timeout $(( $(left) - 15 )) python3 -m bench.gpu --steps 10 --keep-going --row-timeout 150 --no-sync-check \
    --budget-s "$budget" ${GPU_BENCH_ARGS:-}
echo "== done ($(date -u +%T), $(left) s left)"
} 2>&1 | tee "$out/device.log"
cp bench/results/perf_gpu.md bench/results/perf_gpu.json bench/results/gpu_smoke.json bench/RESULTS.md "$out/" 2>/dev/null
tar czf "$out/logs.tar.gz" bench/out/perf/logs bench/out/gpu-smoke/logs $(ls bench/out/perf/gpu-*/run.json bench/out/gpu-smoke/*/run.json bench/out/gpu-smoke/*/eval.json bench/out/gpu-smoke/grid/grid.json bench/out/gpu-smoke/grid/logs 2>/dev/null) 2>/dev/null
ls -la "$out"
