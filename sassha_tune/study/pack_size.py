"""How many trials a study packs into one trial process (``--pack auto|K|1``).

The pack trainer itself is :mod:`sassha_tune.training.packs`; this module decides, for a study's
config and this machine, whether and how many of its trials can be packed, and says why in one
line (docs/packs.md, "Pack size").
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

from ..config.spaces import trial_hparams
from ..errors import UserError

__all__ = ["AUTO_MAX", "parse_pack", "choose_pack_size"]

AUTO_MAX = 16  # auto never packs more (model-steps/s saturates around K = 16 for ResNet-20, field notes §2)


def parse_pack(text: str | None) -> str | int:
    """``--pack``: ``auto``, or an integer >= 1."""
    if text is None:
        return "auto"
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    if t.isdigit() and int(t) >= 1:
        return int(t)
    raise UserError(f"--pack: expected auto or an integer >= 1, got {text!r}")


def _free_cuda_bytes(device: str) -> int | None:
    """Free memory of the CUDA device, asked in a child process (the coordinator keeps no CUDA context)."""
    code = (
        "import sys, torch\n"
        "d = torch.device(sys.argv[1] if sys.argv[1] != 'auto' else 'cuda')\n"
        "print(torch.cuda.mem_get_info(d)[0] if torch.cuda.is_available() else -1)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True, timeout=120)
        value = int(out.stdout.strip().splitlines()[-1])
    except Exception:
        return None
    return value if value >= 0 else None


def _member_bytes(cfg: Any) -> int:
    """A deliberately generous estimate of one member's GPU memory: parameter-sized tensors
    (params, two gradients, optimizer state, probes, double-backward graph: ~12 copies) plus
    saved activations (~600 floats per input element per example, 2 bytes with bf16)."""
    from ..training.models import build_model  # torch: not for parse_pack, which the CLI calls first

    shape = tuple(int(s) for s in (cfg.task.dataset_options.get("shape") or ()))
    known = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "fashion_mnist": (1, 28, 28), "mnist1d": (1, 40),
             "digits": (1, 8, 8)}
    shape = shape or known.get(cfg.task.dataset, (3, 32, 32))
    try:
        model = build_model(cfg.task.model, shape, 100, **dict(cfg.task.model_options))
        n_params = sum(p.numel() for p in model.parameters())
    except Exception:
        n_params = 10_000_000
    elem = 2 if cfg.device.amp == "bf16" else 4
    return 12 * 4 * n_params + cfg.task.batch_size * math.prod(shape) * 600 * elem


def choose_pack_size(cfg: Any, requested: str | int, *, device: str | None, budget_left: int) -> tuple[int, str]:
    """(pack size, one line saying why) for a study's config and ``--pack``."""
    from ..training.packs import pack_blocker  # torch: not for parse_pack, which the CLI calls first

    try:
        hp = trial_hparams(cfg, {})
    except Exception:
        hp = dict(cfg.optimizer.fixed)
    if requested == 1:
        return 1, "one trial at a time (--pack 1)"
    if cfg.task.train is not None:
        return 1, "one trial at a time: cannot pack (task.train: your function trains one model)"
    if cfg.device.processes > 1:
        return 1, f"one trial at a time: cannot pack (each trial runs as {cfg.device.processes} processes)"
    blocker = pack_blocker(cfg.task.model, dict(cfg.task.model_options), hp)
    if blocker is not None:
        return 1, f"one trial at a time: cannot pack ({blocker})"
    if isinstance(requested, int):
        return requested, f"packs of {requested} trials per process (--pack {requested})"
    import torch

    dev = (device or cfg.device.name or "auto").lower()
    if dev == "cpu" or (dev == "auto" and not torch.cuda.is_available()):
        return 1, "one trial at a time (--pack auto on the CPU: a small model already uses the cores)"
    free = _free_cuda_bytes(dev)
    if free is None:
        return 1, "one trial at a time (--pack auto: could not read the GPU's free memory)"
    per = _member_bytes(cfg)
    k = max(1, min(AUTO_MAX, int(0.6 * free) // max(per, 1)))
    why = f"--pack auto: {free / 2**30:.1f} GiB free, ~{per / 2**30:.2f} GiB per member, at most {AUTO_MAX}"
    if k == 1:
        return 1, f"one trial at a time ({why})"
    return k, f"packs of up to {k} trials per process ({why})"
