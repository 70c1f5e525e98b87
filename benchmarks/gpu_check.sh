#!/usr/bin/env bash
# The GPU check (issue 17, item 8) on a machine whose Python already holds a CUDA torch:
# which gloo collectives run on CUDA tensors (gloo_cuda_check.py), the distributed tests
# with CUDA tensors (TP_TEST_DEVICE=cuda), then benchmarks/gpu.py.
# Run from the repository root; results go to $OUT (default ./gpu-check-out). Overrides:
# TESTS (the test files), ROWS (gpu.py's rows, quoted as in a shell), NW (pytest-xdist
# workers), TEST_S / BENCH_S (time limits, s).
set -o pipefail
OUT=${OUT:-$PWD/gpu-check-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TP_BACKEND_CACHE=/tmp/tpcache TORCHINDUCTOR_COMPILE_THREADS=4
# Runs from the source tree, not installed: a dist-info registers the tp_auto entry point
# (without the installed torch range check, so an image's older CUDA torch can run it).
S=/tmp/site; D=$S/tp_backend-0.1.0.dist-info; mkdir -p $D
printf 'Metadata-Version: 2.1\nName: tp_backend\nVersion: 0.1.0\n' > $D/METADATA
printf '[torch_dynamo_backends]\ntp_auto = tp_backend.backend:tp_auto\n' > $D/entry_points.txt
export PYTHONPATH=$S:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/env.txt
python3 -c "import torch,transformers,tp_backend,sys;print(sys.version.split()[0],torch.__version__,transformers.__version__,torch.cuda.get_device_name())" 2>&1 | tee -a $OUT/env.txt || exit 1
timeout 60 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/gloo_cuda_check.py \
  > $OUT/gloo_cuda.log 2>&1
echo "gloo_cuda_check rc=$?"; grep -E "OK|FAIL|Fatal|^  File" $OUT/gloo_cuda.log | head -30
T0=$(date +%s)
eval "set -- ${ROWS:-eager inductor \"tp_auto TP=1\"}"
timeout ${BENCH_S:-230} python3 benchmarks/gpu.py --rows "$@" --out $OUT/gpu.json 2>&1 \
  | tee $OUT/gpu.log | grep -v "^\[rank\|Writing"
echo "bench rc=$? in $(( $(date +%s) - T0 )) s"
# One pytest per file, each with its share of the time, so a file that runs out of time
# still leaves the others' summaries (pytest prints failures only at the end).
FILES=(${TESTS:-tests/test_backend_models.py tests/test_generation.py tests/test_vocab_loss.py \
  tests/test_tp_tensor.py tests/test_state.py tests/test_parallelize_model.py tests/test_training.py})
EACH=$(( ${TEST_S:-290} / ${#FILES[@]} ))
for f in "${FILES[@]}"; do
  T0=$(date +%s); LOG=$OUT/tests-$(basename $f .py).log
  TP_TEST_DEVICE=cuda timeout $EACH python3 -m pytest -q -p no:cacheprovider -n ${NW:-8} \
    --timeout $EACH --tb=short -rfE $f > $LOG 2>&1
  echo "$f rc=$? in $(( $(date +%s) - T0 )) s"
  grep -E "^(FAILED|ERROR)|passed|failed|SIGSEGV|^E  " $LOG | head -12
done
