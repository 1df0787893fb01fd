#!/usr/bin/env bash
# The prepared GPU check, in groups. Each group fits one device call with room to rerun.
#
#     bash bench/gpu_check.sh GROUP              run one group; writes under $OUT (default ./gpu_out)
#     bash bench/gpu_check.sh --dry-run GROUP    print its stages, their timeouts and the sum; run nothing
#
# The groups in priority order, with the question each answers:
#   1. correct  Are the compiled kernels right on this GPU? The CUDA tests (tests/test_cuda.py -m
#               cuda). Then the kernel-facing CPU suite through the compiled kernels (conftest picks
#               CUDA): test_logps, test_stats, test_packed, then test_ops, test_hidden. (What the
#               launchers compile on a GPU is compiled by tests/test_compile.py in CI, no GPU.)
#   2. perf     How close to the roofline, and how far ahead of the alternatives? Issue 9's
#               small-shape table (a sync per call). The logits table at the issue's three shapes:
#               ours, issue 11's stats and entropy-gradient rows, TRL's kernel, Liger; the ratios
#               against their goals print at its end. Eager and torch.compile at the headline shape.
#               The hidden-state table: ours, TRL's ChunkedLogProbFunction, Cut-CE, torch's
#               linear_cross_entropy, eager.
#   3. ops      Does the op hold up as PyTorch sees it, and does the 3-matmul loss pay? Fullgraph
#               torch.compile, CUDA-graph replay, an fp32 master weight at 8x1024x4096x128256; the
#               fused DPO loss with 3 matmuls against 4 (issues 8 and 19).
#   4. train    What does a training step cost? The DPO step, Qwen2-0.5B-shaped, with a profile of the
#               fused step (issue 8). The trainer through FSDP2 with world size 1 against the plain
#               trainer (issue 13). Packed against padded, and vocab-parallel with world size 1
#               (issue 14).
#   5. fit      Does an 8B model train on one GPU, and is the plan right about it? bench/fit.py
#               (issue 22): one DPO step of a Llama-3-8B-shaped model (2 x 1024 tokens) as QLoRA
#               r16, LoRA r16 on a bf16 base, full fine-tuning with bf16 weights and 8-bit AdamW,
#               and full fine-tuning in fp32 with AdamW (expected OOM); each row holds the peak
#               max_memory_allocated, step time, tokens/s and `fused-dpo plan`'s predicted peak
#               (issue 23). Then TRL 1.16's DPOTrainer on the LoRA mode (when trl and datasets
#               import; `python -m bench.fit --mode trl_qlora` is the QLoRA one), and the longest --max-length of LoRA with activation offloading
#               and --padding-free. Needs bitsandbytes: its wheel travels in .whl (make gpu-wheels).
#   6. plan     Is `fused-dpo plan` within 10% of max_memory_allocated at a smaller shape? The
#               trainer's step on the Qwen2-0.5B shape of bench/train_step.py (4 pairs x 1024
#               tokens) through bench/fit.py: fp32 masters with bf16 autocast, with and without
#               gradient checkpointing, LoRA r16 on a bf16 base, QLoRA. Then the activation-offloading
#               CUDA test (same gradients, lower peak).
#
# Budget: a group is at most 300 s, counting its stage timeouts plus the setup's timeouts (50 s).
# The setup installs this checkout without dependencies, and Liger-Kernel, Cut-CE and TRL 1.16 from
# .whl/ when `make gpu-wheels` filled it (carry .whl). `--dry-run` prints the sum, and
# tests/test_gpu_check.py holds every group to it. The device budget is 15 minutes in all, a
# 1-2 minute machine start included. That fits two whole groups with 3 minutes to spare (one short
# stage rerun by hand), or three groups when they end well inside their timeouts. Each stage prints
# its elapsed time, and the summary lists them all, so the next sizing can use measured times. The
# timeouts are estimates: the basis is beside each stage.
#
# Output under $OUT, written as it goes: gpu_check-GROUP.log (every stage's console output, teed
# line by line), plus for perf small/small_shapes.csv, logits/results.csv, logits/logits.png,
# logits_eager/results.csv, logits_eager/logits.png and hidden/results.csv. The bench appends each
# CSV row when it is measured, so a stage cut by its timeout, or killed outright, keeps its rows.
# That is 7 files at most in a group; the device tool brings back 8.
#
# Left out for time: the forward-variant sweep of the first run (FUSED_DPO_STAGES,
# FUSED_DPO_ROWS): `python -m bench logits --providers fused_triton` under those variables repeats
# it. tests/test_compile.py needs no GPU: CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

GROUPS_BUILT="correct perf ops train fit plan"
usage() {
  echo "usage: bash bench/gpu_check.sh [--dry-run] GROUP" >&2
  echo "  GROUP, in priority order: correct, perf, ops, train, fit, plan" >&2
  echo "  (the header of bench/gpu_check.sh says what each group answers)" >&2
}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 1 ] || { usage; exit 2; }
GROUP=$1
case " $GROUPS_BUILT " in
  *" $GROUP "*) ;;
  *)
    case "$GROUP" in
      *) echo "gpu_check.sh: unknown group '$GROUP'" >&2; usage; exit 2 ;;
    esac ;;
esac

BUDGET=0        # seconds: the sum of every timeout in this group, setup included
SUMMARY=()
FAILED=0

# step SECONDS COMMAND...: a setup command under its timeout, counted in the budget; TAIL=N before
# the call keeps the last N lines of its output
step() {
  local t=$1; shift
  BUDGET=$((BUDGET + t))
  [ "$DRY" = 1 ] && return 0
  if [ -n "${TAIL:-}" ]; then
    timeout "$t" "$@" 2>&1 | tail -n "$TAIL"
    return "${PIPESTATUS[0]}"
  fi
  timeout "$t" "$@"
}

# stage SECONDS TITLE COMMAND...: one stage, at most SECONDS in all: COMMAND gets SECONDS - 5, then
# SIGTERM (SIG=INT before the call for pytest, which then prints its summary and durations) and 5 s
# to end before SIGKILL. Its output reaches the log line by line; QUIET=PATTERN drops matching lines.
stage() {
  local t=$1 title=$2; shift 2
  BUDGET=$((BUDGET + t))
  if [ "$DRY" = 1 ]; then printf '  %4d s  %s\n' "$t" "$title"; return 0; fi
  echo; echo "== $title == $(date +%T) (timeout $t s)"
  local t0=$SECONDS rc status
  local cmd=(timeout -k 5 -s "${SIG:-TERM}" $((t - 5)) "$@")
  if [ -n "${QUIET:-}" ]; then
    "${cmd[@]}" 2>&1 | { grep --line-buffered -v -e "$QUIET" || true; }
    rc=${PIPESTATUS[0]}
  else
    "${cmd[@]}" 2>&1
    rc=$?
  fi
  case $rc in
    0) status=ok ;;
    124 | 137) status=TIMEOUT; FAILED=1 ;;
    *) status="rc=$rc"; FAILED=1 ;;
  esac
  echo "-- $status after $((SECONDS - t0)) s of $t"
  SUMMARY+=("$(printf '%-8s %4d s of %4d  %s' "$status" $((SECONDS - t0)) "$t" "$title")")
}

setup() {
  step 10 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  TAIL=2 step 20 python3 -m pip install -q --no-deps --no-build-isolation -e .
  if ls .whl/*.whl >/dev/null 2>&1; then  # Liger-Kernel, Cut-CE, TRL brought by `make gpu-wheels`
    step 10 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    BUDGET=$((BUDGET + 10))
    [ "$DRY" = 1 ] || echo "no .whl/: Liger-Kernel, Cut-CE and TRL rows will be skipped (make gpu-wheels, carry .whl)"
  fi
  step 10 python3 -c "import torch, triton, transformers, fused_dpo, sys; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  [ "$DRY" = 1 ] || echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git)')"
}

# Basis of the timeouts: the 2026-11-27 H100 run (bench/results/2026-11-27-h100, commit 803ab3c)
# where a stage was timed there, else an estimate from the work it does; the H200 lent now is no
# slower. Every pytest stage runs with -x and --durations, so a cut shows how far it got.

group_correct() {
  local XDIST=""
  if [ "$DRY" = 1 ] || python3 -c "import xdist" 2>/dev/null; then XDIST="-n 8"; else
    echo "no pytest-xdist: the kernel-facing suite runs in one process (its compiles may outrun the stages)"
  fi
  # 14 tests, the largest 4x4096x151936 logits (> 2^31 elements); 10 of them took 6.7 s in 2026-11
  SIG=INT stage 45 "CUDA tests" \
    python3 -m pytest -x -m cuda --durations=5 -p no:cacheprovider tests/test_cuda.py
  # The kernel-facing suite in two stages, so a cut in one leaves the other's answer. On the GPU
  # their time is Triton's compiles, one per distinct launch specialisation, about a second each,
  # more than the tests. Recorded through Triton's sm_90 binder on the CPU (2026-12-01), the first
  # stage's 342 tests launch 278 distinct specialisations, the second's 131 tests 182 more.
  # Serially that alone outruns both stages, so the tests spread over 8 processes with
  # pytest-xdist (its wheels travel in .whl: `make gpu-wheels`; checked with -n 2 -x here). The
  # processes share
  # Triton's cache. Without xdist the tests run in one process, and a cut shows how far they got.
  SIG=INT stage 85 "kernel-facing suite on the GPU 1/2: test_logps, test_stats, test_packed" \
    python3 -m pytest -x $XDIST --durations=10 -p no:cacheprovider \
    tests/test_logps.py tests/test_stats.py tests/test_packed.py
  SIG=INT stage 75 "kernel-facing suite on the GPU 2/2: test_ops, test_hidden" \
    python3 -m pytest -x $XDIST --durations=10 -p no:cacheprovider tests/test_ops.py tests/test_hidden.py
}

group_perf() {
  # 3 shapes x 4 providers x 2 modes, 70 calls each (the largest: eager fwd+bwd 22 ms), plus the
  # first compiles
  stage 45 "small shapes, sync per call: host and wall time (issue 9 goals printed beside)" \
    python3 -m bench.small_shapes --out "$OUT/small"
  # +stats: entropy, mean logit, top-1 in the same pass (detached); +entropy_grad: the loss
  # logps.sum() + 0.01 * entropy.sum(); trl_kernel computes the entropy always (detached here).
  # 36 rows. In 2026-11, 12 rows (fused_triton, liger_ce) at these shapes took 24 s with start-up
  # and the ceilings; the extra 4 providers each add a compile and 6 rows.
  stage 80 "logits path: the issue's three shapes, entropy rows beside TRL's kernel, Liger (issue 11)" \
    python3 -m bench logits --quick --shapes 8x1024x128256,4x4096x151936,8x2048x32000 \
    --providers fused_triton,fused_triton+stats,fused_triton+entropy_grad,trl_kernel,trl_kernel+entropy_grad,liger_ce \
    --out "$OUT/logits"
  # The same command took 31 s in 2026-11, mostly Inductor compiling (at three shapes it compiles
  # three times, hence the one shape)
  stage 50 "logits path: eager and torch.compile at 8x1024x128256" \
    python3 -m bench logits --quick --shapes 8x1024x128256 --providers eager,torch.compile \
    --out "$OUT/logits_eager"
  # 9 providers at one shape, 18 rows of 10-60 ms calls; fused, eager and Cut-CE's forward took
  # 26 s in 2026-11. torch_linear_ce needs torch >= 2.13 and is skipped on older images.
  stage 70 "hidden-state path, bf16 weight, entropy rows beside TRL's ChunkedLogProbFunction (issue 11)" \
    python3 -m bench hidden --quick --shapes 8x1024x4096x128256 \
    --providers fused_triton,fused_triton+stats,fused_triton+entropy_grad,trl_chunked,trl_chunked+stats,trl_chunked+entropy_grad,cut_ce,torch_linear_ce,eager \
    --out "$OUT/hidden"
}

group_ops() {
  # three Inductor compiles with their backward, each 10-20 s, then the graph and fp32 cases
  stage 90 "op checks: fullgraph torch.compile, CUDA graph replay, fp32 master weight (8x1024x4096x128256)" \
    python3 -m bench.op_checks --only graph,fp32,compile
  # bf16 and fp32 weights x (4 matmuls, 3 with one pair a group, 3 with the rule's groups): six
  # timed losses of 30-45 ms and their float64 truth
  stage 75 "fused DPO loss from hidden states: 3 vs 4 matmuls, bf16 and fp32 weight (8x1024x4096x128256)" \
    python3 -m bench.op_checks --only matmuls
}

group_train() {
  # 2026-11: the step with 2 variants took 36 s. Now 3 variants, and a profile of 3 fused steps
  # whose tables take seconds to build.
  stage 90 "DPO training step, Qwen2-0.5B-shaped (8 x 1024, V=151936, bf16), with a profile of the fused step" \
    python3 -m bench.train_step --profile
  # a tiny model 4 steps twice, then the Qwen2-shaped step 11 times plain and 11 through FSDP2,
  # two model inits
  QUIET=Warning stage 75 "trainer through FSDP2, world size 1 (NCCL) vs plain: numbers, Qwen2-0.5B-shaped step (issue 13; goal <= 1.05x)" \
    python3 -m bench.dist_step --steps 8
  # its docstring's estimate is 30 s: one model init, eight timed calls, a process group of one
  QUIET=Warning stage 60 "packed vs padded (8 sequences of 128..1024), vocab-parallel world size 1 vs plain (issue 14)" \
    python3 -m bench.packed_vp
}

group_fit() {
  # Each mode in its own process (a clean peak, and an OOM cannot poison the next). Estimates: an
  # 8B model built on the GPU in seconds, the NF4 quantisation of its 224 linear layers on the GPU
  # in seconds, a step of 2 x 1024 tokens about 1-2 s with checkpointing; imports ~10 s each.
  stage 50 "fit (a): QLoRA r16, Llama-3-8B-shaped, 2 x 1024 tokens (goal <= 10 GiB)" \
    python3 -m bench.fit --mode qlora --out "$OUT/fit"
  stage 40 "fit (b): LoRA r16 on a bf16 base (goal <= 22 GiB)" \
    python3 -m bench.fit --mode lora --out "$OUT/fit"
  stage 45 "fit (c): full fine-tuning, bf16 weights, 8-bit AdamW (goal <= 80 GiB)" \
    python3 -m bench.fit --mode full_8bit --out "$OUT/fit"
  stage 35 "fit (d): full fine-tuning, fp32 AdamW (expected OOM; the plan must say it does not fit)" \
    python3 -m bench.fit --mode full_fp32 --out "$OUT/fit"
  stage 40 "fit: TRL 1.16 DPOTrainer on (b), when trl and datasets import (goal: our step <= TRL's, >= 1.3x its tokens/s)" \
    python3 -m bench.fit --mode trl_lora --out "$OUT/fit"
  stage 40 "fit: longest --max-length for (b) with activation offloading and --padding-free (goal >= 16k)" \
    python3 -m bench.fit --mode longest --lengths 8192,16384,24576 --steps 1 --out "$OUT/fit"
}

group_plan() {
  # The Qwen2-0.5B shape: 0.5B parameters built in seconds; a step of 8 x 1024 tokens well under a
  # second (bench/train_step.py: about 0.3 s in 2026-11); plan, build, warm-up and two steps per mode
  stage 55 "plan vs measured: Qwen2-0.5B-shaped trainer step, fp32 masters + bf16 autocast, checkpointing" \
    python3 -m bench.fit --shape qwen2-0.5b --pairs 4 --mode full_fp32 --out "$OUT/plan"
  stage 55 "plan vs measured: the same without gradient checkpointing" \
    python3 -m bench.fit --shape qwen2-0.5b --pairs 4 --mode full_fp32 --no-checkpointing --out "$OUT/plan"
  stage 45 "plan vs measured: LoRA r16 on a bf16 base" \
    python3 -m bench.fit --shape qwen2-0.5b --pairs 4 --mode lora --out "$OUT/plan"
  stage 45 "plan vs measured: QLoRA r16" \
    python3 -m bench.fit --shape qwen2-0.5b --pairs 4 --mode qlora --out "$OUT/plan"
  SIG=INT stage 45 "activation offloading on CUDA: same gradients, lower peak (tests/test_offload.py -m cuda)" \
    python3 -m pytest -x -m cuda --durations=5 -p no:cacheprovider tests/test_offload.py
}

OUT=${OUT:-$(pwd)/gpu_out}
if [ "$DRY" = 1 ]; then
  setup
  echo "gpu_check.sh $GROUP (dry run): setup $BUDGET s of timeouts, then"
  "group_$GROUP"
  echo "  total $BUDGET s of timeouts (limit 300)"
  exit 0
fi

mkdir -p "$OUT"
LOG="$OUT/gpu_check-$GROUP.log"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
  echo "gpu_check.sh $GROUP $(date +%F' '%T)"
  setup
  "group_$GROUP"
  echo; echo "== summary: group $GROUP, $BUDGET s of timeouts == $(date +%T)"
  printf '  %s\n' "${SUMMARY[@]}"
  exit "$FAILED"
} 2>&1 | tee "$LOG"
