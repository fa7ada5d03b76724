"""Trial packs: model-steps/s and trials per GPU-hour vs one trial at a time (docs/benchmarks.md).

ResNet-20 on CIFAR-shaped (3x32x32) and Fashion-MNIST-shaped (1x28x28) synthetic data, SASSHA
(two passes, Hessian refresh every 10 steps), batch 128. For each K: a pack of K members trained
for --steps steps (after 2 warm-up steps), against the same K trials run one after another in
this process. trials/hour assumes a trial = a fixed number of steps, so the ratio of
model-steps/s is the ratio of trials per device-hour.

    python benchmarks/pack_throughput.py --device cuda --steps 30 --ks 1,4,16,32
"""

from __future__ import annotations

import argparse
import time

import torch

from sassha_tune.training.packs import train_pack
from sassha_tune.training.trainer import TrainSpec, train

SHAPES = {"cifar": [3, 32, 32], "fashion": [1, 28, 28]}


def spec(shape, steps, device, amp, seed, batch):
    return TrainSpec(
        dataset="synthetic", data_dir=None, dataset_options=dict(n=batch * (steps + 2) + 16, n_test=64, shape=shape),
        model="resnet20", model_options={}, batch_size=batch, epochs=1, max_steps_per_epoch=steps, augment=None,
        label_noise=0.0, val_fraction=0.01, eval_batch_size=1024, accumulation=1,
        optimizer="sassha", hparams=dict(lr=0.1, rho=0.1, lazy_hessian=10, seed=seed), grad_clip=None,
        schedule="constant", milestones=[0.5, 0.75], gamma=0.1, warmup_fraction=0.0, min_lr_fraction=0.0,
        amp=amp, channels_last=False, device=device, processes=1, seed=seed, progress=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ks", default="1,4,16,32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--amps", default="none,bf16")
    ap.add_argument("--data", default="cifar,fashion")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    print(f"torch {torch.__version__}, device {args.device}, steps {args.steps}, batch {args.batch}")
    print("| data | precision | K | one-at-a-time model-steps/s | pack model-steps/s | speed-up (trials/device-hour) |")
    print("|---|---|---|---|---|---|")
    for data in args.data.split(","):
        for amp in args.amps.split(","):
            for k in ks:
                specs = [spec(SHAPES[data], args.steps, args.device, amp, s, args.batch) for s in range(k)]
                t = time.perf_counter()
                res = train_pack(specs)
                pack_s = time.perf_counter() - t
                pack_ms = res[0].ms_per_step  # per pack step (all members), excluding data/eval setup
                t = time.perf_counter()
                lone_ms = [train(s).ms_per_step for s in specs[: min(k, 2)]]
                single_ms = sum(lone_ms) / len(lone_ms)
                pack_rate = 1000.0 * k / pack_ms
                lone_rate = 1000.0 / single_ms
                print(f"| {data} | {'bf16' if amp == 'bf16' else 'fp32'} | {k} | {lone_rate:.2f} | {pack_rate:.2f} | "
                      f"{pack_rate / lone_rate:.2f}x |", flush=True)
                del res, pack_s


if __name__ == "__main__":
    main()
