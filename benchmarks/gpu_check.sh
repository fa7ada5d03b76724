#!/usr/bin/env bash
# One-call GPU measurement run for sassha-tune (see docs/gpu-check.md).
#
#   bash benchmarks/gpu_check.sh               # on the device machine: every part on CUDA, ~5-8 min
#   bash benchmarks/gpu_check.sh --cpu-smoke   # here: the same commands on the CPU, tiny sizes, < 3 min
#
# Parts, each under its own `timeout` and all under one overall budget (GPU_CHECK_BUDGET_S, default
# 480 s; a part gets min(its cap, what is left)), in this order:
#   1 smoke       every registered optimizer a few steps on a small CUDA model; probe generator on the device
#   2 step_cost   benchmarks/step_cost.py --device cuda (ResNet-20 + WRN-16-4, batch 256, peak memory)
#   3 train_speed benchmarks/train_speed.py --device cuda, real Fashion-MNIST, fp32; then bf16 + channels_last
#   4 sharpness   hessian_metrics (the trial protocol) on a ResNet-20, 1024 Fashion-MNIST examples
#   5 pack_fp32   benchmarks/pack_throughput.py --device cuda --ks 1,4,16,32 --amps none
#   6 pack_bf16   the same with --amps bf16
#   7 dist        2-process NCCL data parallelism (torch.distributed.run) only with >= 2 GPUs
# A failing or timed-out part is recorded and the script goes on; it always exits 0.
#
# Needs only python3 with torch (+ numpy); sassha_tune is imported from this checkout through
# PYTHONPATH (no install). Wheels in .whl/ (optional, for other checks) are installed with
# pip --no-index --no-deps --target. Results: $OUT (or ./gpu_check_out): summary.md (status table +
# every markdown table), gpu_check.log (all output), env.txt, parts.tar.gz (one log per part).
#
# Environment: OUT, PYTHON (default python3), FASHION_DIR (default data/fashion-mnist, then
# /usr/share/datasets/fashion-mnist), GPU_CHECK_BUDGET_S (480), PACK_STEPS (20), GPU_CHECK_CPU_SMOKE=1.

set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 0

MODE=gpu
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) MODE=cpu ;;
        -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (expected --cpu-smoke)" >&2; exit 2 ;;
    esac
done
[ "${GPU_CHECK_CPU_SMOKE:-0}" = 1 ] && MODE=cpu

if [ -z "${OUT:-}" ]; then
    if [ "$MODE" = cpu ]; then OUT="$(mktemp -d /tmp/gpu_check_smoke.XXXXXX)"; else OUT="$REPO/gpu_check_out"; fi
fi
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/gpu_check_work.XXXXXX)"
mkdir -p "$WORK/parts"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
RESERVE=15           # seconds kept for the summary at the end
PACK_STEPS="${PACK_STEPS:-20}"

T0=$SECONDS
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = cpu ]; then
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
    DEV=cpu
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
    DEV=cuda
fi

echo "== gpu_check: mode=$MODE device=$DEV budget=${BUDGET}s out=$OUT $(date -u +%FT%TZ)"

# ---- optional wheels (.whl/*.whl), installed beside the image's packages, never over torch ----
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"  # private: never another run's packages
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$REPO"/.whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
        echo "wheels: installed $(ls "$REPO"/.whl/*.whl | wc -l) into $SITE"
    else
        echo "wheels: pip install FAILED (continuing without them)"
    fi
fi

# ---- data: Fashion-MNIST IDX .gz files (carried folder first, then the Debian package's) ----
FASHION="${FASHION_DIR:-$REPO/data/fashion-mnist}"
if [ ! -f "$FASHION/train-images-idx3-ubyte.gz" ] && [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    FASHION=/usr/share/datasets/fashion-mnist
fi
if [ -f "$FASHION/train-images-idx3-ubyte.gz" ]; then
    echo "data: Fashion-MNIST from $FASHION"
else
    echo "data: Fashion-MNIST NOT FOUND (looked in ${FASHION_DIR:-$REPO/data/fashion-mnist}); parts fall back to synthetic 1x28x28"
fi
export GPU_CHECK_FASHION="$FASHION"

# ---- environment record ----
{
    echo "date: $(date -u +%FT%TZ)"
    echo "mode: $MODE"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown) $(git -C "$REPO" status --short 2>/dev/null | wc -l) changed paths"
    echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)"
    "$PY" - <<'EOF' 2>&1
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
for mod in ("numpy", "optuna", "typer", "yaml", "sqlalchemy", "mnist1d", "matplotlib", "sklearn"):
    try:
        m = __import__(mod)
        print(f"{mod}: {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: missing ({type(e).__name__})")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    echo "cpus: $(nproc)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"

# ---- helper programs (written at run time; the repo's own benchmarks are used where they exist) ----
cat > "$WORK/smoke.py" <<'EOF'
"""Every registered optimizer: a few steps on a small model on --device; check device placement."""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

from sassha_tune.training.models import build_model
from sassha_tune.optim import OPTIMIZERS, build_optimizer

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda")
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--batch", type=int, default=32)
a = ap.parse_args()
dev = torch.device(a.device)
g = torch.Generator().manual_seed(0)
x = torch.randn(a.batch, 3, 32, 32, generator=g).to(dev)
y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
HP = {"sgd": {"lr": 0.05}, "adamw": {"lr": 1e-3}, "sam_sgd": {"lr": 0.05, "rho": 0.05},
      "sam_adamw": {"lr": 1e-3, "rho": 0.05}}
print("| optimizer | amp | steps | first loss | last loss | ms/step | state on device | probe generator |")
print("|---|---|---:|---:|---:|---:|---|---|")
bad = 0
for amp in ("none", "bf16"):
    for name in OPTIMIZERS:
        if amp == "bf16" and name not in ("sgd", "sassha"):
            continue
        try:
            torch.manual_seed(0)
            model = build_model("resnet20", [3, 32, 32], 10).to(dev)
            hp = HP.get(name, {"lr": 0.01, "lazy_hessian": 2})
            opt = build_optimizer(name, model, hp)
            ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp == "bf16" else None

            def closure(model=model, ctx=ctx):
                if ctx is None:
                    return F.cross_entropy(model(x), y)
                with ctx():
                    out = model(x)
                return F.cross_entropy(out.float(), y)

            losses = []
            t = time.perf_counter()
            for _ in range(a.steps):
                losses.append(float(opt.step(closure)))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t) / a.steps
            tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
            on_dev = all(v.device.type == dev.type for v in tensors)
            gen = getattr(opt, "generator", None)
            gen_s = "n/a" if gen is None else str(gen.device)
            gen_ok = gen is None or gen.device.type == dev.type
            if gen is not None:  # checkpoint round trip keeps the generator on the device
                opt2 = build_optimizer(name, model, hp)
                opt2.load_state_dict(opt.state_dict())
                g2 = getattr(opt2, "generator", None)
                gen_ok = gen_ok and g2 is not None and g2.device.type == dev.type
                gen_s += f" (reloaded: {None if g2 is None else g2.device})"
            finite = all(v == v and abs(v) < 1e6 for v in losses)
            ok = finite and on_dev and gen_ok
            bad += not ok
            print(f"| {name} | {amp} | {a.steps} | {losses[0]:.4f} | {losses[-1]:.4f} | {ms:.1f} | "
                  f"{on_dev} ({len(tensors)}) | {gen_s}{'' if ok else ' **FAIL**'} |")
        except Exception as e:  # noqa: BLE001
            bad += 1
            print(f"| {name} | {amp} | - | - | - | - | - | **ERROR** {type(e).__name__}: {str(e)[:120]} |")
if dev.type == "cuda":
    print(f"\npeak CUDA memory over the smoke test: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
print(f"\nsmoke: {bad} failure(s)")
sys.exit(1 if bad else 0)
EOF

cat > "$WORK/sharpness.py" <<'EOF'
"""Time hessian_metrics (default trial protocol) on a ResNet-20 and --subset examples."""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from sassha_tune.training.data import load_dataset
from sassha_tune.errors import DataError
from sassha_tune.training.models import build_model
from sassha_tune.metrics.sharpness import CHEAP_BUDGET, hessian_metrics

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda")
ap.add_argument("--subset", type=int, default=1024)
ap.add_argument("--train-steps", type=int, default=100)
ap.add_argument("--tiny", action="store_true", help="CPU smoke: few iterations of every estimator")
a = ap.parse_args()
dev = torch.device(a.device)
opts = {"max_train": max(4 * a.subset, 2048), "max_test": 256}
try:
    s = load_dataset("fashion_mnist", os.environ.get("GPU_CHECK_FASHION"), device=dev, options=opts)
    src = "Fashion-MNIST"
except DataError:
    s = load_dataset("synthetic", device=dev, options={"shape": [1, 28, 28], "n": opts["max_train"], "n_test": 64})
    src = "synthetic 1x28x28"
torch.manual_seed(0)
model = build_model("resnet20", list(s.input_shape), s.num_classes).to(dev)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model.train()
for i in range(a.train_steps):  # a little training so the metrics are not those of the init
    idx = torch.randint(0, len(s.x_train), (128,), device=dev)
    opt.zero_grad()
    F.cross_entropy(model(s.x_train[idx]), s.y_train[idx]).backward()
    opt.step()
tiny = dict(lambda_max_iters=5, trace_probes=4, sam_steps=2) if a.tiny else {}
print(f"data {src}, model resnet20, subset {a.subset}, {a.train_steps} SGD steps first, device {dev}")
print("| run | wall s | HVPs | grads | lambda_max | iters | converged | trace | trace SE | SAM | adaptive | peak MiB |")
print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
first = None
runs = (("CHEAP_BUDGET (tracker)", dict(CHEAP_BUDGET)), ("default protocol", {}),
        ("default, chunk_size=256", {"chunk_size": 256}))
for label, extra in runs:
    if label.startswith("default,") and first is not None and first > 30:
        print(f"skipping {label}: the default run took {first:.0f} s")
        continue
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    m = hessian_metrics(model, None, s.x_train, s.y_train, subset_size=a.subset, **{**extra, **tiny})
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    if label == "default protocol":
        first = wall
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
    nan = float("nan")
    print(f"| {label} | {wall:.1f} | {m.get('hvp_count')} | {m.get('grad_count')} | {m.get('lambda_max', nan):.4g} | "
          f"{m.get('lambda_iterations')} | {m.get('lambda_converged')} | {m.get('hessian_trace', nan):.4g} | "
          f"{m.get('hessian_trace_se', nan):.3g} | {m.get('sam_sharpness', nan):.4g} | "
          f"{m.get('adaptive_sharpness', nan):.4g} | {peak:.0f} |", flush=True)
EOF

cat > "$WORK/dist.py" <<'EOF'
"""One data-parallel trial under torch.distributed.run (nccl on CUDA, gloo on CPU)."""
import argparse
import os

from sassha_tune.training.trainer import TrainSpec, train

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda")
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--batch", type=int, default=256)
a = ap.parse_args()
world = int(os.environ.get("WORLD_SIZE", "1"))
fashion = os.environ.get("GPU_CHECK_FASHION", "")
use_files = os.path.isfile(os.path.join(fashion, "train-images-idx3-ubyte.gz"))
data = dict(dataset="fashion_mnist", data_dir=fashion, dataset_options={"max_train": a.batch * a.steps + 512}) if use_files \
    else dict(dataset="synthetic", data_dir=None,
              dataset_options={"shape": [1, 28, 28], "n": a.batch * a.steps + 512, "n_test": 64})
for opt, hp in (("sgd", {"lr": 0.1, "momentum": 0.9}), ("sassha", {"lr": 0.15, "rho": 0.2, "lazy_hessian": 10})):
    r = train(TrainSpec(model="resnet20", model_options={}, batch_size=a.batch, eval_batch_size=1024, accumulation=1,
                        epochs=1, max_steps_per_epoch=a.steps, augment=None, label_noise=0.0, val_fraction=0.02,
                        optimizer=opt, hparams=hp, grad_clip=None, schedule="constant", milestones=[0.5, 0.75],
                        gamma=0.1, warmup_fraction=0.0, min_lr_fraction=0.0, amp="none", channels_last=False,
                        device=a.device, processes=world, seed=0, progress=False, **data))
    if r.rank == 0:
        loss = r.history[-1].get("train_loss") if r.history else None
        print(f"| {opt} | {world} | {r.device} | {a.batch} | {r.steps} | {r.ms_per_step:.1f} | {r.status} | {loss} |")
EOF

# ---- part runner ----
NAMES=(); STATUS=(); SECS=()
run_part() {  # run_part NAME CAP_SECONDS CMD...
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET - (SECONDS - T0) - RESERVE))
    local t=$(( cap < left ? cap : left ))
    local log="$WORK/parts/$name.log"
    echo
    echo "== [$name] timeout ${t}s: $*"
    if [ "$t" -lt 20 ]; then
        echo "[$name] SKIPPED: overall budget spent" | tee "$log"
        NAMES+=("$name"); STATUS+=("skipped (budget)"); SECS+=(0)
        return
    fi
    local start=$SECONDS rc
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local st
    case $rc in
        0) st=ok ;;
        124|137) st="TIMEOUT after ${t}s (partial output kept)" ;;
        *) st="FAILED rc=$rc" ;;
    esac
    echo "== [$name] $st in $((SECONDS - start))s"
    NAMES+=("$name"); STATUS+=("$st"); SECS+=($((SECONDS - start)))
}
skip_part() {  # skip_part NAME REASON
    echo; echo "== [$1] SKIPPED: $2" | tee "$WORK/parts/$1.log"
    NAMES+=("$1"); STATUS+=("skipped: $2"); SECS+=(0)
}

FASHION_ARG=(--fashion-dir "$FASHION")
DIST_HDR="| optimizer | ranks | device | global batch | steps | ms/step | status | last train loss |"
if [ "$MODE" = gpu ]; then
    run_part smoke       60  "$PY" "$WORK/smoke.py" --device cuda --steps 6 --batch 64
    run_part step_cost  120  "$PY" benchmarks/step_cost.py --device cuda
    run_part train_speed 90  "$PY" benchmarks/train_speed.py --device cuda --steps 100 --warmup 5 --batch-size 256 \
        "${FASHION_ARG[@]}" --markdown "$WORK/parts/train_speed.md"
    run_part train_speed_bf16 60 "$PY" benchmarks/train_speed.py --device cuda --steps 100 --warmup 5 --batch-size 256 \
        --workloads fashion --amp bf16 --channels-last "${FASHION_ARG[@]}" --markdown "$WORK/parts/train_speed_bf16.md"
    run_part sharpness  120  "$PY" "$WORK/sharpness.py" --device cuda --subset 1024 --train-steps 100
    run_part pack_fp32  150  "$PY" benchmarks/pack_throughput.py --device cuda --steps "$PACK_STEPS" --ks 1,4,16,32 --amps none
    run_part pack_bf16  150  "$PY" benchmarks/pack_throughput.py --device cuda --steps "$PACK_STEPS" --ks 1,4,16,32 --amps bf16
    if [ "${NGPU:-0}" -ge 2 ]; then
        printf '%s\n%s\n' "$DIST_HDR" "|---|---:|---|---:|---:|---:|---|---:|" > "$WORK/parts/dist.hdr"
        run_part dist    120  "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 "$WORK/dist.py" --device cuda
    else
        skip_part dist "only ${NGPU:-0} GPU visible; the 2-process NCCL path needs >= 2"
    fi
else
    run_part smoke       60  "$PY" "$WORK/smoke.py" --device cpu --steps 2 --batch 4
    run_part step_cost   60  "$PY" benchmarks/step_cost.py --device cpu --batch 2 --rounds 1 --models resnet20
    run_part train_speed 45  "$PY" benchmarks/train_speed.py --device cpu --steps 2 --warmup 1 --batch-size 8 --threads 1 \
        "${FASHION_ARG[@]}" --markdown "$WORK/parts/train_speed.md"
    run_part train_speed_bf16 30 "$PY" benchmarks/train_speed.py --device cpu --steps 1 --warmup 1 --batch-size 8 --threads 1 \
        --workloads fashion --amp bf16 --channels-last "${FASHION_ARG[@]}" --markdown "$WORK/parts/train_speed_bf16.md"
    run_part sharpness   45  "$PY" "$WORK/sharpness.py" --device cpu --subset 32 --train-steps 2 --tiny
    run_part pack_fp32   40  "$PY" benchmarks/pack_throughput.py --device cpu --steps 1 --ks 1,2 --batch 4 --amps none --data fashion
    run_part pack_bf16   40  "$PY" benchmarks/pack_throughput.py --device cpu --steps 1 --ks 1,2 --batch 4 --amps bf16 --data fashion
    # the CPU smoke always exercises the 2-process command (gloo) so its flags are proven
    printf '%s\n%s\n' "$DIST_HDR" "|---|---:|---|---:|---:|---:|---|---:|" > "$WORK/parts/dist.hdr"
    run_part dist        60  "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 "$WORK/dist.py" --device cpu --steps 2 --batch 8
fi

# ---- summary ----
SUM="$OUT/summary.md"
{
    echo "# gpu_check ($MODE) $(date -u +%FT%TZ)"
    echo
    echo '```'
    cat "$OUT/env.txt"
    echo '```'
    echo
    echo "| part | status | seconds |"
    echo "|---|---|---:|"
    for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} |"; done
    echo
    echo "total: $((SECONDS - T0)) s of a ${BUDGET} s budget"
    for i in "${!NAMES[@]}"; do
        n=${NAMES[$i]}
        echo
        echo "## $n (${STATUS[$i]})"
        echo
        [ -f "$WORK/parts/$n.hdr" ] && cat "$WORK/parts/$n.hdr"
        # markdown table rows and the few plain result lines each part prints
        grep -E '^\||^(torch |data |peak |smoke: |skipping |GPU|gpu|device )' "$WORK/parts/$n.log" 2>/dev/null || echo "(no table)"
        if [ "${STATUS[$i]}" != ok ]; then
            echo; echo "last lines of its log:"; echo '```'; tail -n 8 "$WORK/parts/$n.log" 2>/dev/null; echo '```'
        fi
    done
} > "$SUM"
tar -czf "$OUT/parts.tar.gz" -C "$WORK" parts 2>/dev/null

echo
echo "================ gpu_check summary ($MODE) ================"
for i in "${!NAMES[@]}"; do printf '%-18s %-45s %5ss\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
echo "total $((SECONDS - T0))s (budget ${BUDGET}s); results in $OUT: summary.md gpu_check.log env.txt parts.tar.gz"
rm -rf "$WORK"
exec 1>&- 2>&-          # let tee flush gpu_check.log before $OUT is collected
wait "$TEE_PID" 2>/dev/null
exit 0
