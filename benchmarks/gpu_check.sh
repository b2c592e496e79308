#!/usr/bin/env bash
# One run of every GPU-path check and benchmark, for a machine with an NVIDIA GPU and torch with CUDA.
# Installs nothing; needs torch (CUDA), numba, numpy, pyarrow, pillow -- no Ray, FAISS or s3fs.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Writes $OUT/gpu_similarity.json, $OUT/gpu_embed.json, $OUT/gpu_check.log and $OUT/env.txt;
# exits non-zero when any check fails (the others still run).
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
} 2>&1 | tee "$OUT/gpu_check.log"
# the pipeline's status is tee's; the functions above recorded failures in the log
grep -q "FAILED" "$OUT/gpu_check.log" && status=1
exit $status
