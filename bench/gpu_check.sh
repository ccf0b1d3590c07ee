#!/usr/bin/env bash
# The GPU check: the one script that a session lent a GPU runs, in one call of the device tool, after
# `bash bench/gpu_wheels.sh` here (docs/gpu.md):
#
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=540)
#
# Phases, each under its own time limit so that one hang cannot eat the call (8.1 minutes at most):
#   gpu        nvidia-smi and torch.cuda must see a GPU; without one the script stops here (exit 2)
#   install    the carried wheels, offline, into a folder put first on PYTHONPATH (with src/), so the
#              image's torch and the rest of its packages are used, and the carried ones win over its own
#   preflight  import swarmllm, load bitsandbytes' CUDA library, start and stop a DHT (the p2p daemon runs),
#              warm the bytecode cache
#   tests      pytest tests/cuda -m cuda
#   bench      bench/gpu_bench.py
# Everything lands in $OUT (the device tool sets it; elsewhere a new temporary folder): setup.log,
# cuda-tests.log, cuda-tests.xml, gpu_bench.log, gpu_bench.json, summary.txt.
# Exit: 0 every phase passed, 1 some phase failed (the others still ran), 2 no GPU or nothing to install.
#
# --install-only: only the install phase and imports of what the wheels bring (no torch needed), for a
# dry run anywhere: GPU_PYTHON=/path/to/python3.12 bash bench/gpu_check.sh --install-only
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
PY=${GPU_PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/swarmllm-gpu-site}
WHEELS=.gpu-wheels
# Seconds per phase: about 1.5 times what each took on an H200 on 2026-12-04 (gpu 4, install 5, preflight 20,
# tests 102, bench 116); 8.1 minutes in all.
LIMIT_GPU=30 LIMIT_INSTALL=45 LIMIT_PREFLIGHT=60 LIMIT_TESTS=150 LIMIT_BENCH=200
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# No network there: never let transformers or the hub try it (a local folder needs none).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
failed=()

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# phase NAME LOG LIMIT COMMAND...: run COMMAND under `timeout`, its output to the console and $OUT/LOG.
phase() {
    local name=$1 log=$2 limit=$3
    shift 3
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/$log"
    # Through bash, so COMMAND may be one of the functions below (exported); `timeout` signals its whole
    # process group, so the bash in between shields nothing.
    timeout --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    local verdict=ok
    if (( rc == 124 || rc == 137 )); then verdict="TIMED OUT"; elif (( rc != 0 )); then verdict="FAILED (exit $rc)"; fi
    note "$name: $verdict in $((SECONDS - start))s"
    [[ $verdict == ok ]] || failed+=("$name")
    return "$rc"
}

check_gpu() {
    command -v nvidia-smi >/dev/null || { echo "no NVIDIA GPU here: nvidia-smi is not installed"; return 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || return 2
    "$PY" - <<'EOF' || return 2
import sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("no GPU: torch.cuda.is_available() is False")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}, compute capability {torch.cuda.get_device_capability(i)}")
EOF
}

install_wheels() {
    compgen -G "$WHEELS/*.whl" >/dev/null || {
        echo "no wheels in $WHEELS: run 'bash bench/gpu_wheels.sh' here and name .gpu-wheels in the run's carry"
        return 2
    }
    # --target, not a venv: the image's python3 is itself a venv, and a venv made from it with
    # --system-site-packages would see the base interpreter's packages, not the image's torch.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    "$PY" - "$SITE" <<'EOF'
import importlib, importlib.util, subprocess, sys
from pathlib import Path
for name in ["pydantic", "cryptography.hazmat.primitives.asymmetric.rsa", "multihash", "cid", "base58", "varint",
             "netaddr", "prefetch_generator", "google.protobuf", "starlette.applications", "uvicorn", "gguf",
             "transformers"]:
    module = importlib.import_module(name)
    where = Path(module.__file__).resolve()
    print(f"{name} {getattr(module, '__version__', '')} from {where}")
    assert Path(sys.argv[1]).resolve() in where.parents, f"{name} does not come from the carried wheels"
# bitsandbytes imports torch, which a dry run need not have: found, not imported (preflight loads it).
bnb = Path(importlib.util.find_spec("bitsandbytes").origin).resolve().parent
assert Path(sys.argv[1]).resolve() in bnb.parents, "bitsandbytes does not come from the carried wheels"
print(f"bitsandbytes from {bnb}: {sorted(p.name for p in bnb.glob('libbitsandbytes_*.so'))}")
p2pd = Path(sys.argv[1]) / "hivemind" / "hivemind_cli" / "p2pd"
usage = subprocess.run([str(p2pd), "-h"], capture_output=True, text=True, timeout=30)
assert "Usage" in usage.stdout + usage.stderr, usage
print(f"p2pd runs: {p2pd}")
EOF
}

run_preflight() {
    "$PY" - <<'EOF'
import time
import hivemind, torch, transformers
import swarmllm.cli.main, swarmllm.client.model, swarmllm.server.server  # noqa: F401  (compiles them once)
from transformers.models.llama import modeling_llama  # noqa: F401
print(f"torch {torch.__version__}, transformers {transformers.__version__} ({transformers.__file__}), "
      f"hivemind {hivemind.__version__}")
import bitsandbytes
from bitsandbytes.cextension import lib
# Without a CUDA library for this torch, bitsandbytes logs an error and goes on with a stub that fails later.
assert lib.compiled_with_cuda, f"bitsandbytes {bitsandbytes.__version__} loaded no CUDA library: {lib}"
print(f"bitsandbytes {bitsandbytes.__version__}: {lib._lib._name}")
t0 = time.perf_counter()
dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
print(f"DHT up in {time.perf_counter() - t0:.1f}s at {[str(a) for a in dht.get_visible_maddrs()]}")
dht.shutdown()
print("DHT stopped")
EOF
}

export PY SITE WHEELS
export -f check_gpu install_wheels run_preflight
note "gpu check $(date -u +%FT%TZ) in $PWD, output in $OUT"
if [[ ${1:-} == --install-only ]]; then
    phase install setup.log "$LIMIT_INSTALL" install_wheels
    exit $?
fi
phase gpu setup.log "$LIMIT_GPU" check_gpu || { note "stopped: this check needs an NVIDIA GPU (docs/gpu.md)"; exit 2; }
phase install setup.log "$LIMIT_INSTALL" install_wheels || { note "stopped: the carried wheels did not install"; exit 2; }
if phase preflight setup.log "$LIMIT_PREFLIGHT" run_preflight; then
    phase tests cuda-tests.log "$LIMIT_TESTS" "$PY" -m pytest tests/cuda -m cuda -p no:cacheprovider -q -rA \
        -o junit_family=xunit1 \
        --timeout 150 --junitxml "$OUT/cuda-tests.xml"
    phase bench gpu_bench.log "$LIMIT_BENCH" "$PY" bench/gpu_bench.py --out "$OUT/gpu_bench.json"
fi
if command -v nvidia-smi >/dev/null; then  # a process still on the GPU here would be one of ours left behind
    note "GPU processes left: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | tr '\n' ';')"
fi
if (( ${#failed[@]} )); then
    note "FAILED: ${failed[*]}"
    exit 1
fi
note "all phases passed"
