#!/usr/bin/env bash
# One command for a GPU hour: install what is missing, run the parity tests on the device, then the
# train-step, decode, serving and HellaSwag benchmarks; everything lands in one report with device and date.
#
#   bash bench/gpu.sh            # on a GPU machine: GPT-2 124M, bf16, micro-batch 16/32/64
#   bash bench/gpu.sh --tiny     # anywhere (CPU): tiny sizes, a few minutes; checks the script itself
#
# The report is written to out/bench/<device>-<date>.md (and printed). Copy its tables into
# docs/benchmarks.md with the device and date they name.
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=false
[[ "${1:-}" == "--tiny" ]] && TINY=true
export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/data/tiktoken}"

if ! $TINY && command -v nvidia-smi >/dev/null && ! python3 -c "import jax_cuda12_plugin" 2>/dev/null; then
  python3 -m pip install --quiet -r requirements-test.txt "jax[cuda12]==0.10.2"
fi
if ! python3 -c "import grain" 2>/dev/null; then
  # GPU images often have JAX, Flax, optax, Orbax and PyTorch but not Grain. Without a package index, carry the
  # wheels: `pip download grain==0.2.18 -d .whl` on a machine that has one (.whl/ is git-ignored).
  if [[ -d .whl ]]; then
    python3 -m pip install --quiet --no-index --find-links .whl grain==0.2.18
  else
    python3 -m pip install --quiet grain==0.2.18
  fi
fi
if ! python3 -c "import fastapi, uvicorn, httpx" 2>/dev/null; then  # bench.bench_serve's server and clients
  if [[ -d .whl ]]; then
    python3 -m pip install --quiet --no-index --find-links .whl fastapi==0.165.0 uvicorn==0.55.0 httpx
  else
    python3 -m pip install --quiet fastapi==0.165.0 uvicorn==0.55.0 httpx
  fi
fi
PLATFORM=$(python3 -c "import jax; print(jax.default_backend())")
DEVICE=$(python3 -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
DATE=$(date -u +%Y-%m-%d)
mkdir -p out/bench
REPORT="out/bench/${DEVICE}-${DATE}.md"
{
  echo "# jaxgpt benchmarks: ${DEVICE} (${PLATFORM}), ${DATE}"
  python3 -c "import jax, flax; print(f'\njax {jax.__version__}, flax {flax.__version__}, {jax.device_count()} device(s)')"
} >"$REPORT"

section() { echo -e "\n## $1\n" | tee -a "$REPORT"; }
bench() { "$@" 2>&1 | grep -E '^\||GFLOP|tokens/s|items/s' | tee -a "$REPORT"; }

if $TINY; then
  TRAIN=(--preset shakespeare-gpt2 --n_layer 2 --n_head 2 --n_embd 64 --block_size 64 --steps 2)  # GPT-2 architecture: every loss applies
  BATCHES=(4 8); ATTENTION=(xla); LOSSES=(fused plain); TEST_PLATFORM=cpu; TESTS=(tests/test_fused_loss.py)
  SAMPLE=(--batch_sizes 1,2 --prompt_len 8 --new_tokens 8 --repeats 1 --hf false)
  EVAL=(--items 4 --batch_size 2)
  SERVE=(--clients 2 --prompt_len 8 --new_tokens 4 --naive_requests 1)
else
  TRAIN=(--preset gpt2-124m-fineweb --grad_accum 1 --steps 20)
  BATCHES=(16 32 64); ATTENTION=(cudnn xla); LOSSES=(fused fused_pallas plain); TEST_PLATFORM="$PLATFORM"
  TESTS=(tests/test_model.py tests/test_fused_loss.py tests/test_head_kernel.py tests/test_convert.py)
  SAMPLE=(--batch_sizes 1,8,64 --dtype bfloat16)
  EVAL=(--items 512 --batch_size 32 --dtype bfloat16)
  SERVE=(--clients 32 --new_tokens 64 --dtype bfloat16)
fi

section "Parity tests on ${TEST_PLATFORM}"
# A failing test is reported, not fatal: the benchmarks still run.
(JAX_PLATFORMS="$TEST_PLATFORM" python3 -m pytest "${TESTS[@]}" -q 2>&1 || true) | tail -1 | tee -a "$REPORT"

section "Train step (bench.bench_train; attention x loss x micro-batch)"
for attention in "${ATTENTION[@]}"; do
  for loss in "${LOSSES[@]}"; do
    for batch in "${BATCHES[@]}"; do
      echo "attention=${attention} loss=${loss} micro-batch=${batch}" | tee -a "$REPORT"
      bench python3 -m bench.bench_train "${TRAIN[@]}" --attention "$attention" --loss "$loss" --batch_size "$batch"
    done
  done
done

section "Decode (bench.bench_sample, next to transformers where asked)"
bench python3 -m bench.bench_sample "${SAMPLE[@]}"

section "Serving (bench.bench_serve: concurrent streaming clients against transformers one request at a time)"
bench python3 -m bench.bench_serve "${SERVE[@]}"

section "HellaSwag scoring (bench.bench_eval)"
bench python3 -m bench.bench_eval "${EVAL[@]}"

echo -e "\nwritten: ${REPORT}"
