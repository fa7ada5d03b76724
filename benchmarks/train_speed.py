"""Training speed of the sassha-tune trainer: ms per step, samples/s and full-epoch time.

Two workloads, each with ResNet-20, crop+flip augmentation on the device and a constant LR:

* Fashion-MNIST-shaped (1x28x28, 60,000 training images): the real files when
  ``/usr/share/datasets/fashion-mnist`` (or ``--fashion-dir``) has them, else synthetic 28x28 data
  of the same shape (the table says which);
* CIFAR-shaped (3x32x32, 50,000 training images): ``cifar10`` from ``--cifar-dir`` when present,
  else synthetic 32x32 data.

For each optimizer (SGD, and SASSHA when registered) and device (CPU, and CUDA when available) it
runs ``--warmup`` steps, then ``--epochs`` x ``--steps`` timed steps through ``trainer.train``
(validation excluded from the step time). The full-epoch time is ms/step x steps per full epoch.

    python benchmarks/train_speed.py --steps 8 --device cpu --threads 1
    python benchmarks/train_speed.py --steps 100 --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
from pathlib import Path

import torch

from sassha_tune.errors import DataError
from sassha_tune.optim import OPTIMIZERS
from sassha_tune.training.data import FASHION_MNIST_DIR, load_dataset
from sassha_tune.training.trainer import TrainSpec, train

HPARAMS = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "sassha": {"lr": 0.15, "rho": 0.2, "lazy_hessian": 10, "weight_decay": 5e-4},
}
FULL_TRAIN = {"fashion": 60_000, "cifar": 50_000}


def _splits(kind: str, args: argparse.Namespace, device: str):
    """Real data when available, else synthetic data of the same shape; returns (splits, source)."""
    n = max(args.batch_size * args.steps * 2, 512)
    opts = {"max_train": n, "max_test": 256}
    try:
        if kind == "fashion":
            return load_dataset(
                "fashion_mnist", args.fashion_dir, val_fraction=0.02, device=device, options=opts
            ), "Fashion-MNIST files"
        return load_dataset(
            "cifar10", args.cifar_dir, val_fraction=0.02, device=device, options=opts
        ), "CIFAR-10 files"
    except DataError:
        shape = [1, 28, 28] if kind == "fashion" else [3, 32, 32]
        s = load_dataset(
            "synthetic",
            val_fraction=0.02,
            device=device,
            options={"shape": shape, "n": n, "n_test": 256, "augment": "crop_flip"},
        )
        return s, f"synthetic {shape[0]}x{shape[1]}x{shape[2]} (files absent)"


def measure(kind: str, optimizer: str, device: str, args: argparse.Namespace) -> dict:
    splits, source = _splits(kind, args, device)
    base = dict(
        # train is given the splits, so these data settings go unused
        dataset="mnist1d",
        data_dir=None,
        dataset_options={},
        augment=None,
        label_noise=0.0,
        val_fraction=0.1,
        model=args.model,
        model_options={},
        batch_size=args.batch_size,
        eval_batch_size=256,
        accumulation=1,
        optimizer=optimizer,
        hparams=HPARAMS.get(optimizer, {}),
        grad_clip=None,
        schedule="constant",
        milestones=[0.5, 0.75],
        gamma=0.1,
        warmup_fraction=0.0,
        min_lr_fraction=0.0,
        device=device,
        amp=args.amp,
        channels_last=args.channels_last,
        processes=1,
        seed=0,
        progress=False,
    )
    if args.warmup:
        train(TrainSpec(epochs=1, max_steps_per_epoch=args.warmup, **base), splits=splits)
    r = train(TrainSpec(epochs=args.epochs, max_steps_per_epoch=args.steps, **base), splits=splits)
    full_steps = math.ceil(FULL_TRAIN[kind] / args.batch_size)
    return {
        "workload": f"{'Fashion-MNIST' if kind == 'fashion' else 'CIFAR'}-shaped",
        "data": source,
        "optimizer": optimizer,
        "device": r.device,
        "status": r.status,
        "steps": r.steps,
        "ms_per_step": r.ms_per_step,
        "samples_per_s": 1000.0 * args.batch_size / r.ms_per_step,
        "epoch_s": full_steps * r.ms_per_step / 1000.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=1, help="timed epochs (default 1)")
    p.add_argument("--steps", type=int, default=8, help="steps per timed epoch (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model", default="resnet20")
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto (CPU, plus CUDA when available)"
    )
    p.add_argument(
        "--optimizers", default="sgd,sassha", help="comma-separated (unregistered ones are skipped)"
    )
    p.add_argument("--workloads", default="fashion,cifar")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--fashion-dir", default=FASHION_MNIST_DIR)
    p.add_argument("--cifar-dir", default=None)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    optimizers = [o for o in args.optimizers.split(",") if o]
    skipped = [o for o in optimizers if o not in OPTIMIZERS]
    optimizers = [o for o in optimizers if o in OPTIMIZERS]

    rows = []
    for device in devices:
        for kind in args.workloads.split(","):
            for opt in optimizers:
                row = measure(kind, opt, device, args)
                rows.append(row)
                print(
                    f"{row['workload']:<22} {row['optimizer']:<7} {row['device']:<6} "
                    f"{row['ms_per_step']:9.1f} ms/step {row['samples_per_s']:8.1f} samples/s "
                    f"epoch ~{row['epoch_s']:8.1f} s  [{row['data']}, {row['status']}]",
                    file=sys.stderr,
                )

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = [
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), {gpu}; "
        f"torch {torch.__version__}; {datetime.date.today().isoformat()}.",
        f"Model {args.model}, batch {args.batch_size}, amp {args.amp}, channels_last {args.channels_last}, "
        f"{args.warmup} warm-up + {args.epochs}x{args.steps} timed steps per row; epoch time = ms/step x full epoch "
        f"({FULL_TRAIN['fashion']:,} / {FULL_TRAIN['cifar']:,} images).",
        "",
        "| workload | data | optimizer | device | ms/step | samples/s | full epoch (s) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['data']} | {r['optimizer']} | {r['device']} | {r['ms_per_step']:.1f} "
            f"| {r['samples_per_s']:.1f} | {r['epoch_s']:.1f} |"
        )
    if skipped:
        lines.append(f"\nNot registered, skipped: {', '.join(skipped)}.")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
