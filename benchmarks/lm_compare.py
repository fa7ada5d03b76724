"""Language models at equal budgets (issue 15): SASSHA-LM against AdamW, SAM-AdamW and Sophia-H on a
small GPT, each tuned with its own language-model search space, the best configuration (lowest
val_ppl, the studies' objective) re-run over training seeds 1, 2, 3.

    apt-get install fortunes      # the text (Debian's fortunes package)
    python benchmarks/lm_compare.py --storage sqlite:///lm_compare.db

For every config in ``benchmarks/lm_compare/``: ``sassha-tune run`` (resumable), ``sassha-tune
export`` of the best trial, ``sassha-tune train --seed N --metrics-out`` for each seed; then a
markdown table of the seed re-runs (mean ± sample std) and of the search (best val_ppl, failures,
seconds) is printed and written to ``docs/results/lm_compare/table.md``. Re-running continues
where it stopped (studies are continued, finished seeds are read from their JSON files).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "lm_compare"
ORDER = ["sassha_lm", "adamw", "sam_adamw", "sophiah"]
SEEDS = (1, 2, 3)


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "sassha_tune.app.cli", *args]
    print("$ sassha-tune " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def mean_std(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", default="sqlite:///lm_compare.db")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "lm_compare"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = sorted(CONFIGS.glob("*.yaml"), key=lambda p: ORDER.index(p.stem) if p.stem in ORDER else 99)
    rows, search_rows = [], []
    for path in configs:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        name = raw["study"]["name"]
        cli("run", str(path), "--storage", args.storage, "--pack", "1")
        study = optuna.load_study(study_name=name, storage=args.storage)
        trials = study.get_trials()
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = min(done, key=lambda t: (t.values[0], t.number))
        exported = out / f"{name}-best.yaml"
        cli("export", name, "--storage", args.storage, "--out", str(exported))
        reruns = []
        for seed in SEEDS:
            metrics = out / f"{name}-seed{seed}.json"
            if not metrics.is_file():
                subprocess.run([sys.executable, "-m", "sassha_tune.app.cli", "train", str(exported), "--seed", str(seed),
                                "--metrics-out", str(metrics)], cwd=ROOT)
            if metrics.is_file():
                reruns.append(json.loads(metrics.read_text(encoding="utf-8")))
        ok = [r for r in reruns if r.get("state") == "complete"]

        def col(key: str, runs: list[dict] = ok) -> list[float]:
            return [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]

        rows.append([
            raw["optimizer"]["name"], f"{len(ok)}/{len(SEEDS)}", mean_std(col("val_ppl")), mean_std(col("test_ppl")),
            mean_std(col("test_acc"), 3), mean_std(col("gen_gap_loss"), 3), mean_std(col("lambda_max"), 1),
            mean_std(col("hessian_trace"), 0), mean_std(col("ms_per_step"), 0),
        ])
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        exploded = [t for t in done if t.values[0] > 1e3]
        search_rows.append([
            raw["optimizer"]["name"], str(len(trials)), f"{best.values[0]:.2f} (trial {best.number})",
            f"{done[0].values[0]:.2f}" if done and done[0].user_attrs.get("published") else "-",
            str(len(failed)), str(len(exploded)),
            f"{sum(float(t.user_attrs.get('train_seconds') or 0) for t in trials):.0f}",
        ])
    headers = ["optimizer", "seeds ok", "val_ppl", "test_ppl", "test_acc (next byte)", "gen_gap_loss",
               "lambda_max", "hessian_trace", "ms/step"]
    search_headers = ["optimizer", "trials", "best val_ppl", "published GPT-2 config's val_ppl", "failed",
                      "complete but val_ppl > 1000", "train seconds (all trials)"]

    def md(h: list[str], table: list[list[str]]) -> str:
        lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table])

    text = ("## Best configuration re-run over seeds 1-3 (mean ± sample std)\n\n" + md(headers, rows) +
            "\n\n## The searches (10 trials each, random search, the published GPT-2 configuration first)\n\n"
            + md(search_headers, search_rows) + "\n")
    (out / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
