#!/usr/bin/env bash
# One run of every GPU-path check and benchmark, for a machine with an NVIDIA GPU and torch with CUDA.
# Installs nothing; needs torch (CUDA) with Triton, numba, numpy, pyarrow, pillow -- no Ray or s3fs. The approximate
# mode's check also needs a GPU build of FAISS (the gpu extra's faiss-gpu, built for CUDA 12); where the
# machine has none, the log says "approx: NOT RUN" with the reason and the other checks still count.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Writes $OUT/gpu_similarity.json, $OUT/gpu_embed.json, $OUT/gpu_select.json, $OUT/gpu_approx.json (when run),
# $OUT/gpu_check.log and $OUT/env.txt; exits non-zero when any check that ran fails (the others still run).
set -u -o pipefail
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, numpy, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'numba', numba.__version__); print('cpus', __import__('os').cpu_count())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
run() {
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if ! timeout -s INT -k 20 "${GPU_CHECK_STEP_TIMEOUT:-260}" "$@"; then
    echo "=== $name FAILED (exit status above)"; status=1
  fi
  echo "=== $name took $((SECONDS - t0)) s"
}
{
  run similarity "$PY" benchmarks/gpu_check_similarity.py --out "$OUT" ${GPU_SIMILARITY_ARGS:---budget-seconds 170}
  run embed "$PY" benchmarks/gpu_check_embed.py --out "$OUT" ${GPU_EMBED_ARGS:---long-epochs 150}
  run select "$PY" benchmarks/gpu_check_select.py --out "$OUT" ${GPU_SELECT_ARGS:---budget-seconds 60}
  if why=$("$PY" -c "from enrich_dist.similarity.approx import faiss_gpus; n, why = faiss_gpus(); print(why); raise SystemExit(n == 0)" 2>&1); then
    run approx "$PY" benchmarks/gpu_check_approx.py --out "$OUT" ${GPU_APPROX_ARGS:---budget-seconds 150}
  else
    echo "=== approx: NOT RUN: ${why##*$'\n'}"
  fi
} 2>&1 | tee "$OUT/gpu_check.log"
# the pipeline's status is tee's; the functions above recorded failures in the log
grep -q "FAILED" "$OUT/gpu_check.log" && status=1
exit $status
