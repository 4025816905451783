#!/usr/bin/env bash
# The KV transfer path on a machine with a CUDA GPU (the CI box has none):
#   1. tests/test_kv_transfer_gpu.py: pulls between two processes, GPU to GPU, host to GPU, GPU to
#      host (NIXL VRAM) and GPU to GPU over the ZeroMQ fallback;
#   2. which UCX protocol carries a GPU-to-GPU READ (UCX_PROTO_INFO);
#   3. `slurmserve bench kv-transfer` with both sides' blocks on the GPU, then host to GPU.
# Needs CUDA torch and slurmserve with its nixl extra importable by python3.
#   scripts/gpu-check.sh [OUT_DIR]        (default runs/gpu-check)
# On a machine that can fetch nothing (torch present): bring cp312 wheels of nixl, nixl-cu13, pyzmq,
# msgspec, pydantic, pydantic_core, annotated-types, typing-inspection and typing_extensions in .whl/,
# then, from the repository's root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . && scripts/gpu-check.sh OUT_DIR
set -uo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
status=0
export PYTHONUNBUFFERED=1

nvidia-smi -L || status=1
python3 -c 'import torch, nixl._api, slurmserve
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))' || exit 1

step() { echo "== $1"; }

step "GPU tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_kv_transfer_gpu.py -rs 2>&1 | tee "$out/pytest.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "UCX protocol of a GPU-to-GPU READ"
UCX_PROTO_INFO=y timeout 90 python3 -m slurmserve bench kv-transfer --device cuda:0 --block-sizes 1m \
  --batches 8 --min-iters 3 --max-iters 3 --result-json "$out/proto.json" >"$out/ucx-proto.log" 2>&1 || status=1
grep -i -E "cuda|rma|get" "$out/ucx-proto.log" | sort | uniq -c | sort -rn | head -20

# the cells' repetitions: at least 7, at most 100, about 512 MiB per cell and path
bench() {
  timeout 150 python3 -m slurmserve bench kv-transfer --target-bytes 536870912 --max-iters 100 "$@" || status=1
}
step "bench kv-transfer, GPU to GPU"
bench --device cuda:0 --result-json "$out/kv-transfer-vram.json"
step "bench kv-transfer, host to GPU"
bench --device cuda:0 --export-device cpu --result-json "$out/kv-transfer-host-to-vram.json"
exit $status
