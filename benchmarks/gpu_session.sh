#!/usr/bin/env bash
# What a lent GPU machine is for, in as few device calls as possible (device tool, from the repository root):
#
#   bash benchmarks/gpu_session.sh session   # the first call of a session, at most 9 minutes in all: build
#                                            # (sm_90, 16 jobs), the GPU tests, the 7B memory table (2.5 min at
#                                            # most), the headline benchmarks (layer level for the three methods,
#                                            # routed adapter, gated attention)
#   bash benchmarks/gpu_session.sh bench     # the optional second call: every benchmark suite
#   bash benchmarks/gpu_session.sh tests     # build the CUDA extension, the tests that use the GPU
#   bash benchmarks/gpu_session.sh memory    # peak memory of training steps at LLaMA-7B and 13B shapes
#   bash benchmarks/gpu_session.sh all       # tests and every suite (may not fit in one 10-minute call)
#
# Each part of `session` gets what is left of the 9 minutes (SESSION_SECONDS) under `timeout`, so the call always
# returns with the logs of what finished; the tables come from what the benchmarks recorded by then.
#
# Logs and tables go to $OUT (the device tool brings them back). Extra pytest arguments for the benchmarks:
# BENCH_ARGS, e.g. BENCH_ARGS="-k routed_glu --benchmark-max-time=0.5". TEST_ARGS replaces the test selection:
# by default the files whose tests run on the GPU (CUDA kernels, Triton kernels, the public ops), without the
# CPU-emulator copies of the CUDA tests (CI runs those, and everything CPU-only); TEST_ARGS=tests runs it all.
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
what=${1:-all}
deadline=$(( $(date +%s) + ${SESSION_SECONDS:-540} ))
left() { echo $(( deadline - $(date +%s) > 10 ? deadline - $(date +%s) : 10 )); }
limit=""
if [[ $what == session ]]; then
  limit="timeout"
  BENCH_ARGS=${BENCH_ARGS:-'-k "decoder_layer or routed_glu_adapter or gated_attention or copy_bandwidth" --benchmark-max-time=0.25'}
fi
run_limited() {  # run_limited SECONDS command...: under `timeout` in a session, as is otherwise
  local seconds=$1; shift
  if [[ -n $limit ]]; then timeout "$seconds" "$@"; else "$@"; fi
}
{
  nvidia-smi
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  git log -1 --format='commit %H %cd' 2>/dev/null
} > "$OUT/env.txt" 2>&1

failed=0
if [[ $what == tests || $what == all || $what == session ]]; then
  # The sm_90 build only: this machine is a Hopper; CI compiles sm_80 separately. MAX_JOBS=16 fits the GPU
  # machine's 16 cores and 128 GiB; CI's rehearsal of this script (.ci/rehearse-gpu-session) sets fewer.
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 PILL_KERNELS_BUILD_CUDA=1 run_limited 300 \
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "extension build FAILED or timed out (build.log)"; failed=1; }
  # What this machine can run: versions, the extension's kernels, each op's backends on cpu and cuda.
  python3 -m pill.cli info >> "$OUT/env.txt" 2>&1
  tail -n 6 "$OUT/env.txt"
  # shellcheck disable=SC2086
  PILL_KERNELS_EXPECT_CUDA_BUILD=1 run_limited $(( $(left) > 180 ? 180 : $(left) )) python3 -m pytest -q -rs \
    ${TEST_ARGS:-tests/test_extension_build.py tests/test_cuda_kernels.py tests/test_triton_kernels.py tests/test_ops.py -k "not emulated"} \
    > "$OUT/tests.log" 2>&1
  tests_status=$?
  echo "tests exit code $tests_status"
  [[ $tests_status == 0 ]] || failed=1
  tail -n 25 "$OUT/tests.log"
fi

if [[ $what == memory || $what == all || $what == session ]]; then
  # Peak memory of a training step over a bf16 and a 4-bit base at LLaMA-7B's shape (13B for PILL outside a
  # session). The image has no bitsandbytes and no network: carry its wheel (docs/measuring.md) in
  # benchmarks/wheels/, installed here without dependencies.
  if ! python3 -c "import bitsandbytes" > /dev/null 2>&1; then
    for wheel in benchmarks/wheels/bitsandbytes-*.whl; do
      [[ -f $wheel ]] && python3 -m pip install -q --no-deps --no-index "$wheel" > "$OUT/bnb_install.log" 2>&1
    done
  fi
  memory_bases="full 4bit"
  python3 -c "import bitsandbytes" > /dev/null 2>&1 || { memory_bases="full"; echo "no bitsandbytes: bf16 rows only"; }
  # shellcheck disable=SC2086
  run_limited $(( $(left) > 150 ? 150 : $(left) )) python3 benchmarks/training_memory.py --device cuda \
    --shape llama-7b --bases $memory_bases --json "$OUT/memory_llama-7b.json" > "$OUT/memory.log" 2>&1
  echo "memory (7B) exit code $?"
  if [[ $what != session ]]; then
    # shellcheck disable=SC2086
    python3 benchmarks/training_memory.py --device cuda --shape llama-13b --methods pill --bases $memory_bases \
      --json "$OUT/memory_llama-13b.json" >> "$OUT/memory.log" 2>&1
    echo "memory (13B) exit code $?"
  fi
  grep '^|' "$OUT/memory.log"
fi

if [[ $what == bench || $what == all || $what == session ]]; then
  # shellcheck disable=SC2086
  eval "run_limited $(left) python3 benchmarks/run.py --out \"$OUT\" --record --record-to \"$OUT/measured_wins.json\" ${BENCH_ARGS:-}" \
    > "$OUT/bench.log" 2>&1
  echo "benchmarks exit code $?"
  cat "$OUT/kernels.md" 2>/dev/null || tail -n 40 "$OUT/bench.log"
fi
exit $failed
