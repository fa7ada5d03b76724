"""Optimizer step cost: ms/step and peak memory of every registered optimizer, relative to SGD.

    python benchmarks/step_cost.py                       # CPU: small batch, few steps
    python benchmarks/step_cost.py --device cuda --batch 256 --steps 20
    python benchmarks/step_cost.py --fd-check            # finite-difference vs exact HVP only

Every optimizer trains its own copy of the model on one fixed batch. Timing is interleaved (each
round runs two steps of every optimizer in turn) and the median is reported; ratios are to SGD in
the same run. On CPU the clock is the process's CPU time (``time.process_time``), which other
jobs on a shared machine barely disturb: run it with ``OMP_NUM_THREADS=1`` so that this is the
single-core cost. On CUDA it is wall-clock time after a synchronize. Optimizers that refresh a Hessian
estimate run with ``lazy_hessian=2`` so that refresh and plain steps alternate; both are timed
and the table reports the cost amortized over k = 10 (the published setting) and each kind alone.
Memory: on CUDA the peak allocated during the two warm-up steps (a refresh step and a plain one)
above what was allocated before them; on all devices the bytes of optimizer state kept between
steps. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

from sassha_tune.optim import OPTIMIZERS, build_optimizer
from sassha_tune.optim.hessian import hvp_from_grads, rademacher_probes

LAZY = {"adahessian", "sophiah", "sassha", "msassha"}
HPARAMS = {
    "sgd": {"lr": 0.1},
    "adamw": {"lr": 1e-3},
    "sam_sgd": {"lr": 0.1, "rho": 0.05},
    "sam_adamw": {"lr": 1e-3, "rho": 0.05},
    "adahessian": {"lr": 0.15},
    "sophiah": {"lr": 1e-3},
    "sassha": {"lr": 0.15, "rho": 0.1},
    "msassha": {"lr": 0.15, "rho": 0.1},
}
K_REPORTED = 10


# --- models ----------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class _LocalResNet(nn.Module):
    """CIFAR ResNet-(6n+2), 16/32/64 channels times ``width``/16 (used if sassha_tune.training.models is missing)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(_Block(c_in, w, 2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _smooth_cnn() -> nn.Module:
    """A small CNN with tanh activations (twice differentiable everywhere), for the FD check."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.Tanh(), nn.Conv2d(16, 32, 3, 2, 1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


def make_model(name: str) -> nn.Module:
    """``resnet20``, ``resnet20x2`` (channels doubled), ``wrn16_4`` or ``smooth_cnn``.

    Uses ``sassha_tune.training.models.build_model`` when it exists, a local CIFAR ResNet otherwise.
    """
    if name == "smooth_cnn":
        return _smooth_cnn()
    width = 32 if name == "resnet20x2" else 16
    name = "resnet20" if name == "resnet20x2" else name
    try:
        from sassha_tune.training.models import build_model
    except ImportError:
        build_model = None
    if build_model is not None:
        return build_model(name, (3, 32, 32), 10, **({"width": width} if width != 16 else {}))
    if name == "resnet20":
        return _LocalResNet(20, width=width)
    if name == "wrn16_4":  # fallback stand-in of similar width
        return _LocalResNet(14, width=64)
    raise ValueError(name)


# --- measurement ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )


def measure_model(model_name: str, optimizers: list[str], batch: int, rounds: int, device: str) -> list[dict]:
    """Time every optimizer on one model, interleaved so that machine load hits them alike."""
    dev = torch.device(device)
    torch.manual_seed(0)
    base_model = make_model(model_name).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    # CPU: process CPU time (robust to other load on a shared machine; run with OMP_NUM_THREADS=1);
    # CUDA: wall-clock after a synchronize
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    runs = []
    for name in optimizers:
        model = copy.deepcopy(base_model)
        hp = dict(HPARAMS[name])
        if name in LAZY:
            hp["lazy_hessian"] = 2
        opt = build_optimizer(name, model, hp)

        def closure(model=model):
            return nn.functional.cross_entropy(model(x), y)

        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
        for _ in range(2):  # warm-up: one refresh step, one plain step (and the peak memory)
            opt.step(closure)
        _sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before if dev.type == "cuda" else None
        runs.append({"name": name, "opt": opt, "closure": closure, "peak": peak, "refresh": [], "plain": []})
    for _ in range(rounds):
        for run in runs:
            for kind in ("refresh", "plain"):  # with lazy_hessian = 2 the next step is a refresh step
                t0 = clock()
                run["opt"].step(run["closure"])
                _sync(dev)
                run[kind].append((clock() - t0) * 1e3)
    rows = []
    for run in runs:
        if run["name"] in LAZY:
            refresh, plain = statistics.median(run["refresh"]), statistics.median(run["plain"])
            ms = (refresh + (K_REPORTED - 1) * plain) / K_REPORTED
        else:
            refresh = plain = ms = statistics.median(run["refresh"] + run["plain"])
        rows.append(
            {
                "model": model_name,
                "optimizer": run["name"],
                "ms": ms,
                "refresh_ms": refresh,
                "plain_ms": plain,
                "peak_bytes": run["peak"],
                "state_bytes": _state_bytes(run["opt"]),
            }
        )
        print(f"  {model_name:10s} {run['name']:10s} {ms:9.1f} ms", file=sys.stderr, flush=True)
    return rows


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | optimizer | ms/step (k=10) | × SGD | refresh step ms | plain step ms "
        "| peak MiB (CUDA) | × SGD | state MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model_name]
        sgd = next((r for r in group if r["optimizer"] == "sgd"), group[0])
        for r in group:
            mem_ratio = (
                "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / max(sgd['peak_bytes'], 1):.2f}"
            )
            lines.append(
                f"| {model_name} | {r['optimizer']} | {r['ms']:.1f} | {r['ms'] / sgd['ms']:.2f} | "
                f"{r['refresh_ms']:.1f} | {r['plain_ms']:.1f} | {_mib(r['peak_bytes'])} | {mem_ratio} | "
                f"{_mib(r['state_bytes'])} |"
            )
    return "\n".join(lines)


# --- finite-difference HVP check ------------------------------------------------------------------------


def fd_check(device: str, batch: int = 16) -> str:
    """Relative L2 error of the Hutchinson diagonal when H z is replaced by (g(w + h z) - g(w)) / h."""
    dev = torch.device(device)
    lines = ["| model | dtype | h | rel. L2 error of Hutchinson diag (1 probe) |", "|---|---|---|---:|"]
    for model_name, dtype in [
        ("resnet20", torch.float32),
        ("resnet20", torch.float64),
        ("smooth_cnn", torch.float32),
        ("smooth_cnn", torch.float64),
    ]:
        torch.manual_seed(0)
        model = make_model(model_name).to(dev, dtype)
        model.eval()  # fixed BN statistics: g(w) is a deterministic function of w
        x = torch.randn(batch, 3, 32, 32, device=dev, dtype=dtype)
        y = torch.randint(0, 10, (batch,), device=dev)
        params = [p for p in model.parameters() if p.requires_grad]

        def grads(create_graph=False, model=model, x=x, y=y, params=params):
            loss = nn.functional.cross_entropy(model(x), y)
            return torch.autograd.grad(loss, params, create_graph=create_graph)

        z = rademacher_probes(params, torch.Generator(device=dev).manual_seed(0))
        g_graph = grads(create_graph=True)
        exact = [
            zi * hv for zi, hv in zip(z, hvp_from_grads(g_graph, params, z, retain_graph=False), strict=True)
        ]
        exact_flat = torch.cat([e.flatten() for e in exact])
        g0 = [g.detach() for g in grads()]
        for h in (1e-2, 1e-3, 1e-4, 1e-6, 1e-8):
            with torch.no_grad():
                torch._foreach_add_(params, z, alpha=h)
            g1 = grads()
            with torch.no_grad():
                torch._foreach_sub_(params, z, alpha=h)
            fd = torch.cat([(zi * (a - b) / h).flatten() for zi, a, b in zip(z, g1, g0, strict=True)])
            err = float((fd - exact_flat).norm() / exact_flat.norm())
            lines.append(f"| {model_name} | {str(dtype).removeprefix('torch.')} | {h:g} | {err:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    parser.add_argument(
        "--rounds",
        "--steps",
        dest="steps",
        type=int,
        default=None,
        help="timed rounds of 2 steps each (default: 10 on CUDA, 5 on CPU)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="default: resnet20 wrn16_4 on CUDA, resnet20 resnet20x2 on CPU",
    )
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--fd-check", action="store_true", help="only the finite-difference HVP check")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (256 if cuda else 8)
    args.steps = args.steps or (10 if cuda else 5)
    args.models = args.models or (["resnet20", "wrn16_4"] if cuda else ["resnet20", "resnet20x2"])
    if args.fd_check:
        print(fd_check(args.device))
        return
    print(
        f"torch {torch.__version__}, device {args.device}, batch {args.batch}, {args.steps} timed rounds of 2 steps, "
        f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}",
        file=sys.stderr,
    )
    rows = [
        r for m in args.models for r in measure_model(m, args.optimizers, args.batch, args.steps, args.device)
    ]
    print(table(rows))
    print()
    print(fd_check(args.device))


if __name__ == "__main__":
    main()
