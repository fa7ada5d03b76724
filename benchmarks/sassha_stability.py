"""Where does SASSHA train, diverge or collapse? A grid over lr x eps x (k, dense start), one task.

Every cell is one real training run through ``trainer.train`` (seed 0, cosine schedule, rho 0.1,
weight decay 1e-4 in the scripts' convention) and reports the final validation accuracy, or
``div@N`` when the run diverged at step N (the trainer checks the loss every 10 steps), or the
accuracy with a ``*`` when the run completed but ended near chance ("collapsed";
``sassha_tune.report.health.near_chance_threshold``: 1.5x chance for 10 classes).

    python benchmarks/sassha_stability.py --dataset mnist1d --model cnn1d --epochs 15
    python benchmarks/sassha_stability.py --dataset digits --model cnn --epochs 10
    python benchmarks/sassha_stability.py --dataset digits --model resnet8 --model-options '{"width": 8}' --epochs 8

The table it prints is the evidence behind ``search_spaces/sassha_nonorm.yaml`` and the
``dense_refresh_steps`` option (docs/optimizer.md, "Dense start and eps on models without
normalization"). CPU, one thread: a 4 x 3 x 3 grid on MNIST-1D takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys

import torch

from sassha_tune.config.spaces import to_hparams
from sassha_tune.report.health import near_chance_threshold
from sassha_tune.training.trainer import TrainSpec, train


def cell(spec: TrainSpec) -> str:
    res = train(spec)
    if res.status == "diverged":
        return f"div@{res.steps}"
    acc = res.history[-1]["val_acc"] if res.history else float("nan")
    return f"{100 * acc:.1f}{'*' if acc <= near_chance_threshold(res.splits.num_classes) else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist1d")
    ap.add_argument("--model", default="cnn1d")
    ap.add_argument("--model-options", default="{}", help="JSON object of model options")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", default="0.03,0.1,0.3,1.0")
    ap.add_argument("--eps", default="1e-8,1e-6,1e-4")
    ap.add_argument("--variants", default="10:0,10:50,1:0",
                    help="comma list of k:N (lazy_hessian k, dense_refresh_steps N)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lrs = [float(v) for v in args.lr.split(",")]
    epss = [float(v) for v in args.eps.split(",")]
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    print(f"# SASSHA stability grid: {args.dataset} / {args.model} {args.model_options}, {args.epochs} epochs, "
          f"batch {args.batch_size}, cosine, rho 0.1, wd 1e-4, seed 0")
    print(f"# {datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s)")
    print("# cell: final val % | div@step (diverged) | val %* (completed near chance)\n")
    header = ["k, dense N", "eps", *[f"lr {lr:g}" for lr in lrs]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (k, n), eps in itertools.product(variants, epss):
        row = [f"{k}, {n}", f"{eps:g}"]
        for lr in lrs:
            hp = to_hparams("sassha", {"lr": lr, "rho": 0.1, "lazy_hessian": k, "eps": eps, "weight_decay": 1e-4},
                            seed=0)
            hp["dense_refresh_steps"] = n
            spec = TrainSpec(dataset=args.dataset, data_dir=None, dataset_options={}, augment=None, label_noise=0.0,
                             val_fraction=0.1, model=args.model, model_options=json.loads(args.model_options),
                             epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=1024, accumulation=1,
                             max_steps_per_epoch=None, optimizer="sassha", hparams=hp, grad_clip=None,
                             schedule="cosine", milestones=[0.5, 0.75], gamma=0.1, warmup_fraction=0.0,
                             min_lr_fraction=0.0, amp="none", channels_last=False, device="cpu", processes=1, seed=0,
                             progress=False)
            row.append(cell(spec))
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
