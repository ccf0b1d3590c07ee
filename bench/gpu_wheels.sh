#!/usr/bin/env bash
# Fetch, here, the wheels that the lent GPU machine lacks into .gpu-wheels/ (git-ignored), for
# bench/gpu_check.sh to install there offline. That machine has no network: it has Python 3.12 with torch,
# transformers, numpy, scipy, safetensors, huggingface_hub and many more (see
# /work/.library/device/KINDS.md), but not hivemind and the rest of what swarmllm needs, and its
# transformers (5.17) predates the `cache=` keyword that swarmllm calls (transformers 5.24).
#
# The versions are the ones this checkout's .venv runs (`make setup`), so the GPU machine runs what the
# tests here ran, except where a pin says why not. What travels with a `run` call is capped at 64 MiB in all (the working tree included):
# this script fails if the wheels pass 60 MiB. bitsandbytes (41 MiB as published, with native libraries for
# every CUDA, ROCm and XPU release) is trimmed here to its CPU library and the CUDA 13 ones, since the GPU
# machine's torch is 2.11+cu130; the wheel keeps its name and a RECORD that matches, so pip installs it as
# usual. The SmolLM2 GGUF (94 MiB) cannot travel, so the GPU check makes a random-weight model of SmolLM2's
# geometry there instead (tests/cuda/conftest.py).
#
# Usage: bash bench/gpu_wheels.sh    (needs the network to PyPI; run `make setup` first)
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.gpu-wheels
PIP=.venv/bin/pip
LIMIT_MIB=60

# What swarmllm imports at run time (itself, hivemind's DHT and p2p daemon, the API host, the GGUF reader)
# and the machine lacks or has in a version too old. Each pulls in nothing else that is missing there:
# checked against KINDS.md's package list (grpcio-tools, a build-time need of hivemind, is never imported).
BINARY=(
    hivemind                                      # ships the p2pd binary (Go): no build there
    base58 py-multihash blake3 mmh3 morphys       # hivemind's peer ids
    py-cid py-multibase py-multicodec netaddr configargparse
    cryptography cffi pycparser                   # hivemind's RSA identities
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
    protobuf                                      # hivemind's messages need >= 5.27; the machine's is unknown
    starlette uvicorn gguf
    transformers==5.24.0                          # the `cache=` keyword needs 5.24 (the machine has 5.17);
                                                  # 5.25 needs huggingface_hub 2.4+, the machine has 1.33
    bitsandbytes                                  # the CUDA int8 and nf4 kernels (models/quant_cuda.py)
)
# Published as source only; pure Python, so the wheels built here run on any CPython 3.
SOURCE=(varint python-baseconv prefetch-generator)

[[ -x $PIP ]] || { echo "no $PIP: run 'make setup' first (the versions come from it)" >&2; exit 1; }

pinned() {  # NAME -> NAME==VERSION as installed in .venv; NAME==VERSION stays as it is
    [[ $1 == *==* ]] && { echo "$1"; return; }
    local version
    version=$("$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p')
    [[ -n $version ]] || { echo "$1 is not installed in .venv: run 'make setup'" >&2; exit 1; }
    echo "$1==$version"
}

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
for name in "${BINARY[@]}"; do
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DEST" "$(pinned "$name")" 2>&1 \
        | grep -v "^WARNING: Location" || true
done
for name in "${SOURCE[@]}"; do
    "$PIP" wheel -q --no-deps --no-binary :all: -w "$DEST" "$(pinned "$name")" 2>&1 \
        | grep -v "^WARNING: Location" || true
done

# bitsandbytes without the native libraries the GPU machine never loads: it loads the one for torch's CUDA
# version (libbitsandbytes_cuda130.so under torch 2.11+cu130), or the CPU one. Rebuilt entry by entry in the
# original order with the original timestamps, so the same wheel gives the same bytes.
for wheel in "$DEST"/bitsandbytes-*.whl; do
    .venv/bin/python - "$wheel" <<'PY'
import re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d+)\.so")
with zipfile.ZipFile(wheel) as src:
    entries = src.infolist()
    dropped = {i.filename for i in entries
               if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", i.filename)
               and not keep.fullmatch(i.filename.split("/")[-1])}
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(trimmed, "w") as dst:
        for info in entries:
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # pip checks every file it installs against it
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",")[0] not in dropped).encode()
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data, compresslevel=9)
trimmed.replace(wheel)
print(f"{wheel.name}: dropped {', '.join(sorted(n.split('/')[-1] for n in dropped))}")
PY
done

# One wheel per package, or pip refuses the whole install there.
expected=$(( ${#BINARY[@]} + ${#SOURCE[@]} ))
found=$(find "$DEST" -name '*.whl' | wc -l)
if (( found != expected )); then
    echo "expected $expected wheels in $DEST, found $found:" >&2
    ls "$DEST" >&2
    exit 1
fi

ls -l "$DEST" | awk 'NR > 1 { printf "%8.2f MiB  %s\n", $5 / 1048576, $9 }'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
awk -v w="$total" -v t="$tree" 'BEGIN { printf "wheels: %.1f MiB; working tree: %.1f MiB; together %.1f of the 64 MiB a run carries\n", w / 1048576, t / 1048576, (w + t) / 1048576 }'
if (( total > LIMIT_MIB * 1048576 )); then
    echo "the wheels pass ${LIMIT_MIB} MiB: they would not travel with the working tree" >&2
    exit 1
fi
