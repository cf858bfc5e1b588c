#!/usr/bin/env bash
# Issue 16's GPU checks (the perturbation engine), for a session that has a device machine.
#
# Two calls of the device tool, each under its 10-minute limit (about 15 minutes of device
# time together), from the repository root there:
#
#   bash experiments/gpu_checks.sh            # tests, ops, step 125m + 1.3b (~8 min)
#   bash experiments/gpu_checks.sh memory nf4 # GPU memory 125m, then the 8 GiB 7B NF4 step
#   bash experiments/gpu_checks.sh offload    # offloaded ZO: overlap vs none vs plain (~4 min)
#
# Output: one file per part and summary.txt under $OUT (the tool's folder) or ./gpu-checks.
# Each part has its own time limit, so one that hangs leaves the others their time.
#
# The device image has torch, triton and transformers but not bitsandbytes (the NF4 part and
# the NF4 tests need it). Carry its wheel: here, in the repository root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and name ".whl" in the call's carry: this script installs what it finds there.
set -u
out=${OUT:-gpu-checks}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

part() {  # part NAME SECONDS COMMAND...: run under a limit, keep its output, log its status
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  status=$?
  echo "   exit $status after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 30 "$out/$name.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, triton, transformers as t; print('torch', torch.__version__,
'triton', triton.__version__, 'transformers', t.__version__)"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests ops step)
for what in "${parts[@]}"; do
  case $what in
    tests)  # the engine's CUDA paths, then the older GPU tests (NF4 ones skip without bnb)
      part tests 240 $py -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_engine_gpu.py tests/test_gpu.py tests/test_offload_gpu.py ;;
    ops)  # kernels per step: philox buckets on the device, and the one read after the update
      part ops 60 $py -m zo.cli bench ops --device cuda --generator philox ;;
    step)  # step / two forwards and vs the naive MeZO loop; version 1 timed in the same run
      part step-125m 90 $py -m zo.cli bench step --device cuda --shape 125m --dtype bfloat16 \
        --repeats 10 --also generator=torch-chunks-v1,prefetch=off
      part step-1.3b 150 $py -m zo.cli bench step --device cuda --shape 1.3b --dtype bfloat16 \
        --repeats 10 --also generator=torch-chunks-v1,prefetch=off ;;
    memory)  # max_memory_allocated of a ZO-SGD step over a forward's (fresh processes)
      part memory-125m 120 $py -m zo.cli bench memory --device cuda --shape 125m \
        --dtype bfloat16 ;;
    nf4)  # Llama-2-7B shape, NF4 base + 0.1% fp32 deltas, 8 GiB cap; zo plan beside it
      part 7b-nf4 420 $py experiments/bench_7b_nf4.py --device cuda --cap-gib 8 \
        --batch 16 --seq 256 --attention sdpa ;;
    offload)  # step time and device peak: plain, offload without overlap, with k = 1, 2
      part offload 300 $py experiments/bench_offload.py --device cuda --hidden 1024 \
        --layers 8 --inter 2816 --vocab 32000 --dtype bfloat16 --prefetch 1 2 --steps 3 ;;
    *) echo "unknown part $what (tests ops step memory nf4 offload)" >&2; exit 2 ;;
  esac
done
