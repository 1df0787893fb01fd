#!/usr/bin/env bash
# One prepared GPU check for a machine with no network (torch, triton, transformers preinstalled).
# Installs this checkout without dependencies, runs the CUDA tests (compiled kernels, realistic
# vocabularies, B*T*V > 2**31), then the timing table. Logs and CSV land under $OUT.
# Budget: about 5 minutes on an H100; each stage has its own timeout so the table always prints.
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests =="
timeout 150 python3 -m pytest -q -x -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15

echo "== block-size sweep (forward+backward, 8x1024x128256 bf16) =="
for blk in 1024 2048 4096 8192; do
  FUSED_DPO_BLOCK_V=$blk timeout 60 python3 -m bench logits --quick --providers fused_triton \
    --out "$OUT/sweep_$blk" 2>&1 | grep -E "8x1024x128256" | sed "s/^/BLOCK_V=$blk /"
done | tee "$OUT/block_sweep.log"

echo "== timing table =="
timeout 240 python3 -m bench all --quick --providers eager,torch.compile,fused_triton,liger_ce,cut_ce \
  --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40

echo "== DPO training step, Qwen2-0.5B-shaped (8 x 1024, V=151936, bf16) =="
timeout 120 python3 -m bench.train_step 2>&1 | tee "$OUT/train_step.log" | tail -5
echo "== done; logs and CSV under $OUT =="
