#!/usr/bin/env bash
# Peer comparison: lse vs PyTorch vs JAX on the CPU, same cases, same thread count.
#
#   bash bench/peers/run.sh                 the project's targets table (7 cases, full size)
#   bash bench/peers/run.sh --quick         a smoke test on small shapes (seconds, not minutes)
#   bash bench/peers/run.sh --linear        the fused linear cross-entropy table (4096x1024x32000,
#                                           f32 and bf16: several minutes)
#
# It (1) creates bench/peers/.venv and installs the pinned CPU peers of requirements.txt into
# it (skipped when the venv is already complete), (2) builds `lse` (cargo build --release -p
# lse-cli), (3) runs `lse bench --json` and peers.py on the same cases, threads and repeats,
# and (4) prints one table with the ratios and writes it, with the merged JSON, to
# bench/peers/results/<date>.{md,json}.
#
# Options (each has an environment variable of the same meaning; a flag wins):
#   --quick              small shapes, every op, f32/bf16/f16: a smoke test of the whole chain
#   --linear             the linear cross-entropy cases (issue 13's targets) instead of the
#                        targets table; peak memory at 8192x1024x131072 is a separate call:
#                        --cases linear_cross_entropy:8192x1024x131072:f32 --repeats 1 --warmup 0
#   --threads N          THREADS     threads (and pinned cores) per side [default: nproc]
#   --cases LIST         CASES       op:ROWSxCLASSES:dtype,...  [default: the targets table]
#                                    (linear_cross_entropy takes NxDxV: tokens x hidden x classes)
#   --ops LIST           OPS         \ any of these three instead of --cases: every op x dtype
#   --dtypes LIST        DTYPES       > x shape [defaults: the four ops, f32, 4096x32000]
#   --shapes LIST        SHAPES      /  shapes are ROWSxCLASSES
#   --repeats N          REPEATS     timed calls per case, both sides [default: 10]
#   --warmup N           WARMUP      untimed calls per case, peers (lse bench does 1) [default: 2]
#   --frameworks LIST    FRAMEWORKS  any of torch, jax, lse.torch, torch.lce [default: all four]
#                                    (torch.lce: F.linear_cross_entropy's chunked path, for the
#                                    linear op only; torch is PyTorch's unfused path there)
#                                    (lse.torch: lse's Python binding, built from crates/lse-py
#                                    into the venv, timed from PyTorch like torch's own ops)
#   --skip-build         SKIP_BUILD=1   use the existing target/release/lse (and the lse
#                                       package already in the venv)
#   --reinstall          REINSTALL=1    delete the venv and install it again
#   --install-only                      set up the venv and stop
#   LSE_BIN=PATH                        time this lse binary instead of target/release/lse
#                                       (give --skip-build too, unless it is that one)
#   PEERS_TORCH_INSTALL=full            plain `pip install torch==VERSION` with all its CUDA
#                                       dependencies (5.3 GB) instead of the lean set
#   PYTHON                              the interpreter that creates the venv [python3, >= 3.11]
#
# Ops: logsumexp, softmax, log_softmax, cross_entropy_grad (loss + gradient),
# linear_cross_entropy (loss + dH, dW, db from hidden states). Dtypes: f32, bf16, f16.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
RESULTS="$HERE/results"
REQUIREMENTS="$HERE/requirements.txt"
TORCH_LEAN="$HERE/torch-lean.txt"   # included by requirements.txt

ALL_OPS="logsumexp,softmax,log_softmax,cross_entropy_grad"
TARGET_CASES="logsumexp:4096x32000:f32,softmax:4096x32000:f32,log_softmax:4096x32000:f32"
TARGET_CASES+=",cross_entropy_grad:4096x32000:f32,cross_entropy_grad:4096x32000:bf16"
TARGET_CASES+=",cross_entropy_grad:65536x1000:f32,softmax:65536x1000:bf16"
LINEAR_CASES="linear_cross_entropy:4096x1024x32000:f32,linear_cross_entropy:4096x1024x32000:bf16"

THREADS="${THREADS:-}"
CASES="${CASES:-}"
OPS="${OPS:-}"
DTYPES="${DTYPES:-}"
SHAPES="${SHAPES:-}"
REPEATS="${REPEATS:-10}"
WARMUP="${WARMUP:-2}"
FRAMEWORKS="${FRAMEWORKS:-torch,jax,lse.torch,torch.lce}"
SKIP_BUILD="${SKIP_BUILD:-0}"
REINSTALL="${REINSTALL:-0}"
PEERS_TORCH_INSTALL="${PEERS_TORCH_INSTALL:-lean}"
PYTHON="${PYTHON:-python3}"
QUICK=0
LINEAR=0
INSTALL_ONLY=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "run.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --linear) LINEAR=1 ;;
        --threads) need_value "$@"; THREADS="$2"; shift ;;
        --cases) need_value "$@"; CASES="$2"; shift ;;
        --ops) need_value "$@"; OPS="$2"; shift ;;
        --dtypes) need_value "$@"; DTYPES="$2"; shift ;;
        --shapes) need_value "$@"; SHAPES="$2"; shift ;;
        --repeats) need_value "$@"; REPEATS="$2"; shift ;;
        --warmup) need_value "$@"; WARMUP="$2"; shift ;;
        --frameworks) need_value "$@"; FRAMEWORKS="$2"; shift ;;
        --skip-build) SKIP_BUILD=1 ;;
        --reinstall) REINSTALL=1 ;;
        --install-only) INSTALL_ONLY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

# ---------------------------------------------------------------------------------------------
# The cases

if [[ $QUICK == 1 ]]; then
    OPS="${OPS:-$ALL_OPS}"
    DTYPES="${DTYPES:-f32,bf16,f16}"
    SHAPES="${SHAPES:-64x1000,512x4096}"
fi
if [[ $LINEAR == 1 && -z "$CASES" ]]; then
    CASES="$LINEAR_CASES"
fi
if [[ -z "$CASES" ]]; then
    if [[ -n "$OPS$DTYPES$SHAPES" ]]; then
        IFS=, read -r -a op_list <<< "${OPS:-$ALL_OPS}"
        IFS=, read -r -a dtype_list <<< "${DTYPES:-f32}"
        IFS=, read -r -a shape_list <<< "${SHAPES:-4096x32000}"
        for op in "${op_list[@]}"; do
            for shape in "${shape_list[@]}"; do
                for dtype in "${dtype_list[@]}"; do
                    CASES+="${CASES:+,}$op:$shape:$dtype"
                done
            done
        done
    else
        CASES="$TARGET_CASES"
    fi
    if [[ $QUICK == 1 ]]; then
        CASES+=",linear_cross_entropy:256x64x1000:f32,linear_cross_entropy:256x64x1000:bf16"
    fi
fi
[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || die "--repeats must be a positive integer"
[[ "$WARMUP" =~ ^[0-9]+$ ]] || die "--warmup must be a non-negative integer"

# The cores this process may use; THREADS defaults to all of them.
CORES="$(nproc)"
THREADS="${THREADS:-$CORES}"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
(( THREADS <= CORES )) || echo "run.sh: warning: $THREADS threads on $CORES cores" >&2

# ---------------------------------------------------------------------------------------------
# The venv (bench/peers/.venv): created once, reused while complete

# The stamp records what was installed: the requirements files and the install mode.
stamp_text() { { cat "$REQUIREMENTS" "$TORCH_LEAN"; echo "mode=$PEERS_TORCH_INSTALL"; } | sha256sum | cut -d' ' -f1; }
venv_complete() {
    [[ -x "$VENV/bin/python" && -f "$VENV/.peers-stamp" ]] &&
        [[ "$(cat "$VENV/.peers-stamp")" == "$(stamp_text)" ]] &&
        "$VENV/bin/python" -c 'import torch, jax, numpy' 2> /dev/null
}

if [[ $REINSTALL == 1 ]]; then
    rm -rf "$VENV"
fi
if venv_complete; then
    echo "run.sh: venv complete: $VENV" >&2
else
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" --version 2>&1); torch 2.15 needs Python >= 3.11 (set PYTHON)"
    echo "run.sh: installing the peers into $VENV (about 4.6 GB; see requirements.txt)" >&2
    started=$SECONDS
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    rm -f "$VENV/.peers-stamp"
    if [[ "$PEERS_TORCH_INSTALL" == full ]]; then
        # torch with every dependency its metadata names (the whole CUDA stack and triton).
        torch_pin="$(grep -E '^torch==' "$TORCH_LEAN")"
        "$VENV/bin/python" -m pip install --only-binary=:all: "$torch_pin"
    fi
    # The lock file, as is: pip resolves nothing (see the comment at its top for why).
    "$VENV/bin/python" -m pip install --no-deps --only-binary=:all: -r "$REQUIREMENTS"
    "$VENV/bin/python" -c 'import torch, jax, numpy' ||
        die "the venv does not import torch and jax; see the pip output above"
    stamp_text > "$VENV/.peers-stamp"
    echo "run.sh: installed in $((SECONDS - started)) s; $(du -sh "$VENV" | cut -f1) in $VENV" >&2
fi
[[ $INSTALL_ONLY == 1 ]] && exit 0
PY="$VENV/bin/python"

# ---------------------------------------------------------------------------------------------
# lse

LSE="${LSE_BIN:-$ROOT/target/release/lse}"
if [[ $SKIP_BUILD != 1 ]]; then
    (cd "$ROOT" && cargo build --release -p lse-cli)
fi
[[ -x "$LSE" ]] || die "$LSE not found (build it: cargo build --release -p lse-cli)"
# lse.torch: the Python package, built by the venv's maturin (as `pip install ./crates/lse-py`).
if [[ ",$FRAMEWORKS," == *",lse.torch,"* && $SKIP_BUILD != 1 ]]; then
    PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation \
        --force-reinstall "$ROOT/crates/lse-py"
fi
"$LSE" bench --help > /dev/null 2>&1 || die "$LSE has no 'bench' subcommand; rebuild it"

# Pin lse to the same cores the peers get (peers.py pins itself with sched_setaffinity).
PIN=()
if (( THREADS < CORES )); then
    cpu_list="$("$PY" -c "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0))[:$THREADS])))")"
    if command -v taskset > /dev/null; then
        PIN=(taskset -c "$cpu_list")
    else
        echo "run.sh: warning: no taskset; lse runs $THREADS threads unpinned" >&2
    fi
fi

# Other work on the machine skews every number here (with as many threads as cores, one
# descheduled thread stalls a whole parallel region): say so in the report.
LOAD="$(cut -d' ' -f1 /proc/loadavg 2> /dev/null || echo '?')"
if awk -v l="$LOAD" 'BEGIN { exit !(l + 0 > 0.5) }'; then
    echo "run.sh: warning: load average $LOAD before the run; the machine is not idle" >&2
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "run.sh: $THREADS threads; cases: $CASES" >&2
lse_files=()
i=0
while read -r ops dtype shape; do
    i=$((i + 1))
    out="$WORK/lse-$i.json"
    echo "run.sh: lse bench --op $ops --dtype $dtype --shape $shape" >&2
    ${PIN[@]+"${PIN[@]}"} "$LSE" bench --json --threads "$THREADS" --repeats "$REPEATS" \
        --op "$ops" --dtype "$dtype" --shape "$shape" > "$out"
    lse_files+=("$out")
done < <("$PY" "$HERE/report.py" plan --cases "$CASES")

# ---------------------------------------------------------------------------------------------
# The peers

"$PY" "$HERE/peers.py" --threads "$THREADS" --cases "$CASES" --frameworks "$FRAMEWORKS" \
    --repeats "$REPEATS" --warmup "$WARMUP" --out "$WORK/peers.json"

# ---------------------------------------------------------------------------------------------
# The table

mkdir -p "$RESULTS"
stamp="$(date +%Y-%m-%d-%H%M%S)"
mode="targets table"
[[ $QUICK == 1 ]] && { stamp+="-quick"; mode="quick (smoke test: small shapes, not a measurement)"; }
[[ "$CASES" != "$TARGET_CASES" && $QUICK == 0 ]] && mode="custom cases"
[[ "$CASES" == "$LINEAR_CASES" && $QUICK == 0 ]] && mode="linear cross-entropy table"
lse_version="$("$LSE" --version | awk '{print $2}')"
commit="$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2> /dev/null)" ]]; then
    commit+="+dirty"
fi

"$PY" "$HERE/report.py" merge --cases "$CASES" --lse "${lse_files[@]}" \
    --peers "$WORK/peers.json" \
    --meta "date=$(date '+%Y-%m-%d %H:%M:%S %Z')" "lse_version=$lse_version ($commit)" \
    "mode=$mode" "repeats=$REPEATS" "load=$LOAD" "cores=$CORES" \
    "cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)" \
    --json "$RESULTS/$stamp.json" --md "$RESULTS/$stamp.md"
echo "run.sh: wrote $RESULTS/$stamp.md and $RESULTS/$stamp.json" >&2
