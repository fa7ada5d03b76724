"""Budget health through the real CLI: trials that COMPLETE at chance accuracy ("near chance") and
failures by reason in `status`, `report` and `compare`.

One real study on MNIST-1D (tiny MLP, one epoch, CPU), its three trials enqueued so that the
outcome does not depend on the sampler: lr 1e-7 (the net stays at its initialization, near
chance), lr 0.3 (it trains) and lr 100 (it diverges). They run as one pack (`--pack 3`), so the
stored `num_classes` also goes through the pack path. An "old" study, made with Optuna directly
and without `num_classes`, must show no near-chance information and not crash.
"""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.report.health import budget_health, failure_kind, near_chance, near_chance_threshold
from sassha_tune.study.records import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONFIG = {
    "study": {"name": "health", "sampler": {"name": "random", "seed": 0}},
    "budget": {"n_trials": 3},
    "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [32]}, "epochs": 1,
             "batch_size": 64},
    "optimizer": {
        "name": "sassha",
        "fixed": {"lazy_hessian": 2, "rho": 0.05, "weight_decay": 1.0e-4},
        "enqueue_published": True,
        "search_space": {
            "params": {"lr": {"type": "float", "low": 1.0e-7, "high": 100.0, "log": True}},
            "published": [
                {"source": "untrained", "lr": 1.0e-7},
                {"source": "trains", "lr": 0.3},
                {"source": "diverges", "lr": 100.0},
            ],
        },
    },
    "metrics": {"subset_size": 128, "budget": {"lambda_max_iters": 5, "trace_probes": 4, "sam_steps": 2}},
    "device": "cpu",
    "seed": 0,
}


def _invoke(args: list[str]) -> str:
    result = CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _state_table(status_output: str) -> dict[str, str]:
    """`status STUDY`'s state table as {label: count} (labels keep their indentation)."""
    rows = {}
    for line in status_output.splitlines():
        cells = [c for c in line.split("│") if c.strip()]
        if len(cells) == 2:
            rows[cells[0].rstrip()[1:]] = cells[1].strip()
    return rows


def _old_study(url: str) -> None:
    """A study as older versions stored it: val_acc but no num_classes; failures without reason."""
    old = optuna.create_study(study_name="old", storage=url, direction="maximize")
    old.set_user_attr("optimizer", "sgd")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}
    for i, acc in enumerate((0.1, 0.6)):  # 0.1 would be near chance with 10 classes: not guessed
        old.add_trial(optuna.trial.create_trial(
            value=acc, params={"lr": 0.01 * (i + 1)}, distributions=dist,
            user_attrs={"val_acc": acc, "test_acc": acc, "train_seconds": 1.0, "device": "cpu"}))
    old.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"lr": 0.5}, distributions=dist))


def test_near_chance_definition():
    ten = {"num_classes": 10}
    assert near_chance("COMPLETE", {**ten, "val_acc": 0.15}) is True  # the bound is included
    assert near_chance(TrialState.COMPLETE, {**ten, "val_acc": 0.1}) is True
    assert near_chance("COMPLETE", {**ten, "val_acc": 0.16}) is False
    # binary: 1.5x chance would be 0.75, but the margin is capped at 5 points above chance
    assert near_chance("COMPLETE", {"num_classes": 2, "val_acc": 0.55}) is True
    assert near_chance("COMPLETE", {"num_classes": 2, "val_acc": 0.7}) is False
    assert near_chance_threshold(100) == pytest.approx(0.015) and near_chance_threshold(10) == pytest.approx(0.15)
    assert near_chance("FAIL", {**ten, "val_acc": 0.1}) is False  # failed, not near chance
    assert near_chance("PRUNED", {**ten, "val_acc": 0.1}) is False
    # unknown, never guessed: no num_classes, no val_acc, or a value that is no class count
    assert near_chance("COMPLETE", {"val_acc": 0.1}) is None
    assert near_chance("COMPLETE", ten) is None
    assert near_chance("COMPLETE", {**ten, "val_acc": None}) is None
    assert near_chance("COMPLETE", {"num_classes": True, "val_acc": 0.1}) is None
    assert near_chance("COMPLETE", {"num_classes": 1, "val_acc": 0.1}) is None
    assert [failure_kind(r) for r in ("diverged", "error: ValueError: x", "rank_failed: rank 1", None)] == [
        "diverged", "error", "rank_failed", "unknown"]
    rows = [TrialRecord(i, state, {}, None, attrs) for i, (state, attrs) in enumerate([
        ("COMPLETE", {**ten, "val_acc": 0.1}),
        ("COMPLETE", {"val_acc": 0.1}),
        ("FAIL", {"failure_reason": "diverged"}),
        ("FAIL", {})])]
    health = budget_health(rows)
    assert (health["complete"], health["near_chance"], health["near_chance_known"]) == (2, 1, 1)
    assert health["failures"] == {"diverged": 1, "unknown": 1} and health["failures_known"] == 1


@pytest.mark.slow
def test_status_report_compare_count_near_chance(tmp_path):
    cfg = tmp_path / "health.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    url = f"sqlite:///{tmp_path / 'h.db'}"
    _invoke(["run", cfg, "--storage", url, "--pack", "3"])
    trials = optuna.load_study(study_name="health", storage=url).get_trials()
    # the diverged trial is told PRUNED (the sampler learns from it) and still counted as diverged
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert [t.user_attrs["num_classes"] for t in trials] == [10, 10, 10]  # packed trials store it too
    untrained, trained, diverged = trials
    assert untrained.user_attrs["val_acc"] <= near_chance_threshold(10) < trained.user_attrs["val_acc"]
    assert diverged.user_attrs["failure_reason"] == "diverged"
    _old_study(url)

    rows = _state_table(_invoke(["status", "health", "--storage", url]))
    assert rows["  near chance (of COMPLETE)"] == "1" and rows["COMPLETE"] == "2"
    assert rows["PRUNED"] == "1" and rows["  diverged"] == "1" and rows["FAIL"] == "0"

    _invoke(["report", "health", "--storage", url, "--out", tmp_path / "rep"])
    md = (tmp_path / "rep" / "report.md").read_text()
    health = md.split("## Budget health")[1].split("##")[0]
    assert "near chance (of complete; val_acc &lt;= chance + min(chance / 2, 0.05)" in health  # HTML-escaped
    assert any(line.startswith("| near chance") and line.rstrip().endswith("1 |") for line in health.splitlines())
    assert "| complete " in health and "| pruned: diverged (told the sampler as pruned) " in health
    table = md.split("## Best trials")[1].split("##")[0].strip().splitlines()
    assert table[0].split("|")[-2].strip() == "near_chance"
    marked = [line.split("|")[1].strip() for line in table[2:] if line.split("|")[-2].strip() == "yes"]
    assert marked == [str(untrained.number)]

    printed = _invoke(["compare", "health", "old", "--storage", url, "--out", tmp_path / "cmp"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    ranking = md.split("## Ranking")[1].split("\n## ")[0]
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in ranking.splitlines() if line.startswith("|")]
    header, body = lines[0], {line[1]: dict(zip(lines[0], line, strict=True)) for line in lines[2:]}
    assert {"near_chance", "diverged"} <= set(header)
    assert (body["health"]["near_chance"], body["health"]["diverged"]) == ("1", "1")
    assert (body["old"]["near_chance"], body["old"]["diverged"]) == ("-", "-")  # unknown, not 0
    assert "near_chance" in printed and "diverged" in printed


@pytest.mark.slow
def test_old_study_shows_no_near_chance(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_study(url)
    status = _invoke(["status", "old", "--storage", url])
    rows = _state_table(status)
    assert rows["COMPLETE"] == "2" and rows["FAIL"] == "1"
    assert not [label for label in rows if label.startswith("  ")]  # nothing new: no num_classes, no reasons
    assert "near chance" not in status

    printed = _invoke(["report", "old", "--storage", url, "--out", tmp_path / "rep"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "near chance" not in printed and "near chance" not in md and "near_chance" not in md
    health = md.split("## Budget health")[1].split("##")[0]
    assert "| complete " in health and "| failed " in health and "failed: " not in health
