#!/usr/bin/env bash
# The GPU checks and the GPU benchmark on a CUDA machine, in one call of under 8 minutes:
#
#   benchmarks/gpu_run.sh          # all: environment, GPU tests (decode parity first), then the benchmark
#   benchmarks/gpu_run.sh tests    # environment report + the GPU tests only (tests/test_gpu.py, -m gpu)
#   benchmarks/gpu_run.sh bench    # ViT-B/16 fp16, 20,000 images, every approach (vitpipe decodes on the GPU)
#
# Budget (the device tool's 15 minutes cover every start and call): tests <= 150 s, benchmark
# <= 270 s, so `all` ends within ~7 minutes even on a cold machine. Results go to $OUT (default
# benchmarks/results/gpu). Where the machine lacks the project's packages and cannot reach a
# registry, a prebuilt site-packages bundle for its Python (.devcarry/site312.tar.xz: ray, s3fs,
# pydantic, seaweedfs' `weed`, ...; carried in two calls, it is over one call's limit) is unpacked
# first; on a machine with `pip install -e '.[test]'` done, nothing is unpacked.
set -u
MODE=${1:-all}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
if [ -f .devcarry/site312.tar.xz ]; then
  [ -d /tmp/site/ray ] || { mkdir -p /tmp/site && tar -xJf .devcarry/site312.tar.xz -C /tmp/site &&
                             tar -xzf .devcarry/extra312.tar.gz -C /tmp/site; }
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
log="$OUT/log-$MODE.txt"
t0=$(date +%s)
step() { echo "== $(( $(date +%s) - t0 )) s: $*" | tee -a "$log"; }
bench() { local limit=$1; shift; timeout "$limit" python3 -m benchmarks.bench --out "$OUT" "$@" 2>&1 \
            | grep -v -E "INFO|WARNING|^\{" >> "$log"; }  # the tables go to $OUT; the log keeps what else it said

if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  step "environment"
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; nproc; free -g | head -2;
    df -h /dev/shm | tail -1;
    python3 -c "import sys, torch, ray, pyarrow, s3fs, pydantic, PIL; print(sys.version.split()[0], 'torch', torch.__version__,
torch.cuda.get_device_name(0), 'ray', ray.__version__, 'pyarrow', pyarrow.__version__, 'pillow', PIL.__version__)";
    python3 -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1 | tail -1;
    python3 -c "import tensorrt" 2>&1 | tail -1; weed version | head -1; } 2>&1 | tee -a "$log"
  step "GPU tests: GPU decode against the CPU path first, then engines and whole jobs"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -s -m gpu tests/test_gpu.py tests/test_engines.py 2>&1 \
    | tee -a "$log" | grep -E "GPU vs CPU|passed|failed|SKIP|Error" | tail -30
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  # The GPU targets: ViT-B/16 fp16 at 20,000 images, vitpipe (decode on the GPU) beside the
  # engine alone, the plain Ray recipe and the DataLoader script; first row and images/s after it.
  step "ViT-B/16 fp16, 20,000 images, all approaches"
  bench 270 --images 20000 --models vit_b_16 --precisions fp16 --engine-seconds 4 --name vit_b_16-20k-gpu
  step "done"
  tail -n 30 "$OUT"/vit_b_16-20k-gpu.md
fi
