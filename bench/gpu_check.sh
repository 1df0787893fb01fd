#!/usr/bin/env bash
# One prepared GPU check for a machine with no network (torch, triton, transformers preinstalled).
# Installs this checkout without dependencies, runs the CUDA tests (compiled kernels, realistic
# vocabularies, B*T*V > 2**31), a block-size sweep, the timing tables (logits path, hidden-state
# path) and one DPO training step. Expected about 5 minutes on an H100; the stage timeouts add up
# to 590 s, so the whole script ends inside one 10-minute device call whatever happens.
#
# Under $OUT (at most 8 files come back from the device tool): gpu_check.log, logits/results.csv,
# logits/logits.png, hidden/results.csv.
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$(dirname "$0")/.."
stage() { echo; echo "== $* =="; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
  if ls .whl/*.whl >/dev/null 2>&1; then  # Liger-Kernel, Cut-CE brought by `make gpu-wheels`
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/: Liger-Kernel and Cut-CE rows will be skipped (make gpu-wheels, carry .whl)"
  fi

  stage "CUDA tests"
  timeout 120 python3 -m pytest -q -x -m cuda tests/test_cuda.py 2>&1 | tail -15

  stage "forward variants x block sizes: fused_triton, fwd and fwd+bwd, 8x1024x128256 bf16"
  for lse in block lane; do
    for blk in 2048 4096 8192; do
      FUSED_DPO_LSE=$lse FUSED_DPO_BLOCK_V=$blk timeout 30 python3 -m bench logits --quick \
        --providers fused_triton --shapes 8x1024x128256 --out "/tmp/sweep_${lse}_$blk" 2>&1 \
        | grep -E "^logits" | sed "s/^/LSE=$lse BLOCK_V=$blk /"
    done
  done

  stage "logits path: the issue's three shapes plus a short vocab sweep"
  timeout 140 python3 -m bench logits --quick \
    --shapes 8x1024x128256,4x4096x151936,8x2048x32000,8x1024x256000,2x1024x128256 \
    --providers fused_triton,eager,torch.compile,liger_ce --out "$OUT/logits" 2>&1

  stage "hidden-state path"
  timeout 90 python3 -m bench hidden --quick --providers fused_triton,eager,cut_ce \
    --out "$OUT/hidden" 2>&1

  stage "DPO training step, Qwen2-0.5B-shaped (8 x 1024, V=151936, bf16)"
  timeout 60 python3 -m bench.train_step 2>&1
  stage "done"
} 2>&1 | tee "$LOG"
