"""Reports: tables, figures, report.md / compare.md, read-only access, error messages.

The studies are small real studies in a temporary SQLite file, built with Optuna's ask/tell:
each trial really trains an MLP on the "synthetic" dataset (1 epoch, 6 steps, CPU) with
``sassha_tune.training.trainer`` and measures its sharpness with ``sassha_tune.metrics.sharpness.hessian_metrics``
on a tiny budget; the trial attributes are stored as the objective stores them.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch

from sassha_tune import report
from sassha_tune.errors import StorageError
from sassha_tune.metrics.sharpness import generalization_gap, hessian_metrics
from sassha_tune.training.trainer import TrainSpec, train
from sassha_tune.trial.objective import final_metrics

optuna.logging.set_verbosity(optuna.logging.WARNING)

METRIC_HEADERS = ("val_acc", "test_acc", "gen_gap", "lambda_max", "trace", "sam_sharp", "adapt_sharp", "seconds")
DATA = {"n": 512, "n_test": 256, "dim": 10, "hidden": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained_attrs(optimizer: str, hparams: dict, seed: int) -> dict:
    """Train for 6 steps and measure; the user attributes a trial stores (failure_reason if it failed)."""
    spec = TrainSpec(dataset="synthetic", data_dir=None, dataset_options=DATA, model="mlp",
                     model_options={"hidden": [32]}, epochs=1, batch_size=64, augment=None, label_noise=0.0,
                     val_fraction=0.25, optimizer=optimizer, hparams=hparams, schedule="constant",
                     milestones=[0.5, 0.75], gamma=0.1, warmup_fraction=0.0, grad_clip=None, amp="none",
                     channels_last=False, device="cpu", seed=seed, progress=False, max_steps_per_epoch=6,
                     eval_batch_size=1024, processes=1, accumulation=1, min_lr_fraction=0.0)
    result = train(spec)
    if result.status != "completed":
        return {"failure_reason": result.failure_reason or result.status}
    m = final_metrics(result.model, result.splits)
    gap = generalization_gap({"acc": m["train_acc"], "loss": m["train_loss"]},
                             {"acc": m["val_acc"], "loss": m["val_loss"]})
    s = result.splits
    h = hessian_metrics(result.model, None, s.x_train, s.y_train, subset_size=128, lambda_max_iters=10,
                        trace_probes=4, sam_steps=2)
    keys = ("lambda_max", "hessian_trace", "hessian_trace_se", "sam_sharpness", "adaptive_sharpness", "hvp_count")
    return {
        **{k: m[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss", "test_acc", "test_loss")},
        **gap, **{k: h[k] for k in keys},
        "epochs_completed": result.epochs_completed, "train_seconds": result.train_seconds,
        "ms_per_step": result.ms_per_step, "device": result.device,
    }


def _suggest(trial: optuna.Trial, optimizer: str, lr: tuple[float, float]) -> dict:
    hparams = {"lr": trial.suggest_float("lr", *lr, log=True)}
    if optimizer == "sassha":
        hparams["rho"] = trial.suggest_float("rho", 0.01, 0.2, log=True)
        hparams["lazy_hessian"] = trial.suggest_categorical("lazy_hessian", [1, 2, 5])
        hparams["eps"] = trial.suggest_float("eps", 1e-6, 1e-2, log=True)
    return hparams


def _unsynced_storage(url: str) -> optuna.storages.RDBStorage:
    """The test's writer: SQLite without fsync (the many small commits of ask/tell dominate the runtime)."""
    storage = optuna.storages.RDBStorage(url)

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _no_fsync(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA synchronous=OFF")

    storage.engine.dispose()  # reconnect with the pragma
    return storage


def _build_study(url: str, name: str, n_trials: int, *, optimizer: str = "sassha",
                 lr: tuple[float, float] = (1e-2, 1.0), directions: tuple[str, ...] = ("maximize",),
                 seed: int = 0, running: int = 0) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=_unsynced_storage(url), directions=list(directions),
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    study.set_user_attr("optimizer", optimizer)
    study.set_user_attr("config", {"optimizer": optimizer, "epochs": 1,
                                   "storage": "postgresql://tuner:hunter2@db.example/optuna"})
    study.set_user_attr("search_space", {"lr": {"low": lr[0], "high": lr[1], "log": True}})
    for _ in range(n_trials):
        trial = study.ask()
        attrs = _trained_attrs(optimizer, _suggest(trial, optimizer, lr), seed=trial.number)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if "failure_reason" in attrs:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        values = [attrs["val_acc"], attrs["lambda_max"]][: len(directions)]
        study.tell(trial, values if len(values) > 1 else values[0])
    for _ in range(running):
        study.ask()  # left RUNNING, as in a study still in progress
    return study


class _CountingStorage(optuna.storages.RDBStorage):
    """The real RDBStorage, counting the reads of each study's trials (by study name): Optuna's
    ``get_all_trials`` and its cached storage (what ``optuna.load_study`` wraps an RDBStorage in)
    both read them with ``_get_trials``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.trial_reads: Counter[str] = Counter()

    def _get_trials(self, study_id, *args, **kwargs):
        self.trial_reads[self.get_study_name_from_id(study_id)] += 1
        return super()._get_trials(study_id, *args, **kwargs)


def _dump(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return list(con.iterdump())
    finally:
        con.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """Studies the read-only tests share: SASSHA (10 trials + 1 running), wide-lr SGD with
    divergences (8 + 2 running) and a two-objective SASSHA study (8)."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("shared") / "studies.db"
    url = f"sqlite:///{path}"
    return {
        "path": path, "url": url,
        "sassha": _build_study(url, "sassha", 10, running=1),
        "sgd": _build_study(url, "sgd-wide", 8, optimizer="sgd", lr=(0.1, 1e8), running=2),
        "mo": _build_study(url, "mo", 8, directions=("maximize", "minimize")),
    }


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "studies.db"
    return path, f"sqlite:///{path}"


def test_load_rows_one_row_per_finished_trial(shared):
    study = shared["sgd"]
    rows = report.load_rows(study)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(rows) == len(finished) == 8
    assert all(r.state in ("COMPLETE", "FAIL", "PRUNED") for r in rows)
    complete = [r for r in rows if r.state == "COMPLETE"]
    assert complete and all(set(r.params) == {"lr"} for r in complete)
    assert all(r.values == [r.user_attrs["val_acc"]] for r in complete)
    assert all(r.user_attrs["device"] == "cpu" for r in complete)
    failed = [r for r in rows if r.state == "FAIL"]
    assert failed, "SGD with lr up to 1e8 diverges in some trials"
    assert all(r.user_attrs["failure_reason"] == "diverged" for r in failed)


def test_best_trials_table_has_params_and_metric_columns(shared):
    study = shared["sassha"]
    table = report.best_trials_table(study, n=3, width=400)
    header = table.splitlines()[0].split()
    assert header[:5] == ["trial", "eps", "lazy_hessian", "lr", "rho"]
    assert tuple(header[5:]) == METRIC_HEADERS
    best = max((t for t in study.trials if t.values), key=lambda t: t.values[0])
    assert table.splitlines()[2].split()[0] == str(best.number)
    assert len(table.splitlines()) == 2 + 3


def test_terminal_table_fits_the_width_and_says_what_it_left_out(shared):
    study = shared["sassha"]
    wide = report.best_trials_table(study, n=3, width=400)
    assert max(map(len, wide.splitlines())) > 80  # the full table does not fit 80 columns
    for width in (100, 60):
        lines = report.best_trials_table(study, n=3, width=width).splitlines()
        assert all(len(line) <= width for line in lines)
        start = next(i for i, line in enumerate(lines) if line.startswith("(left out: "))
        note, lines = " ".join(lines[start:]), lines[:start]
        # stacked blocks when even the kept columns do not fit, each starting with the trial number
        blocks = [lines[0].split()] + [lines[i + 1].split() for i, line in enumerate(lines[:-1]) if not line]
        assert all(b[0] == "trial" for b in blocks)
        shown = [h for b in blocks for h in b[1:]]
        assert shown[:4] == ["eps", "lazy_hessian", "lr", "rho"]
        assert {"val_acc", "gen_gap", "lambda_max"} <= set(shown)
        left_out = [h for h in METRIC_HEADERS if h not in shown]
        assert left_out and set(note[len("(left out: "):].split(";")[0].split(", ")) == set(left_out)
    # markdown keeps every column
    assert all(h in report.best_trials_table(study, n=3, tablefmt="github") for h in METRIC_HEADERS)


def test_build_figures_labels_and_one_point_per_complete_trial(shared):
    study = shared["sassha"]
    n_complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    figs = report.build_figures(study)
    assert {"gap_vs_lambda_max", "gap_vs_adaptive_sharpness", "pareto", "history", "importances",
            "learning_curves", "params_vs_lambda_max", "parallel_coordinates", "best_vs_training",
            "slice_lr", "slice_rho", "slice_lazy_hessian", "slice_eps"} == set(figs)
    # no num_classes stored: near chance unknown, every complete trial counts as trained
    per_param = [ax for ax in figs["params_vs_lambda_max"].axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in per_param] == ["eps", "lazy_hessian", "lr", "rho"]
    assert all(len(ax.collections[0].get_offsets()) == n_complete for ax in per_param)
    parallel = figs["parallel_coordinates"].axes[0]
    assert len(parallel.collections[0].get_segments()) == n_complete  # one line per trial
    assert len(parallel.lines) == 6  # one vertical axis per coordinate
    assert [t.get_text().split("\n")[0] for t in parallel.get_xticklabels()] == [
        "eps", "lazy_hessian", "lr", "rho", "lambda_max", "val_acc"]
    # these trials store no per-epoch history: the figure says so
    assert "no trial stored a per-epoch history" in figs["learning_curves"].axes[0].texts[0].get_text()
    for key, xlabel in (("gap_vs_lambda_max", "lambda_max"), ("gap_vs_adaptive_sharpness", "adaptive sharpness")):
        ax = figs[key].axes[0]
        assert xlabel in ax.get_xlabel()
        assert "generalization gap" in ax.get_ylabel()
        assert len(ax.collections[0].get_offsets()) == n_complete
        assert len(figs[key].axes) == 2  # the colour bar (val accuracy)
    pareto = figs["pareto"].axes[0]
    assert "lambda_max" in pareto.get_xlabel() and pareto.get_ylabel() == "validation accuracy"
    assert len(pareto.collections[0].get_offsets()) == n_complete
    assert 1 <= len(pareto.lines[0].get_xdata()) <= n_complete
    history = figs["history"].axes[0]
    assert history.get_xlabel() == "trial number"
    assert len(history.collections[0].get_offsets()) == n_complete
    best_line = history.lines[0].get_ydata()
    assert list(best_line) == sorted(best_line)  # best so far never decreases
    lr_slice = figs["slice_lr"].axes[0]
    assert lr_slice.get_xlabel() == "lr" and lr_slice.get_xscale() == "log"
    assert len(lr_slice.collections[0].get_offsets()) == n_complete
    assert figs["slice_lazy_hessian"].axes[0].get_xscale() == "linear"
    imp = figs["importances"].axes[0]
    assert {t.get_text() for t in imp.get_yticklabels()} == {"lr", "rho", "lazy_hessian", "eps"}


def test_importances_degrade_gracefully_with_one_trial_or_one_param(db):
    _, url = db
    one = _build_study(url, "one", 1)
    fig = report.build_figures(one)["importances"]
    assert "at least 2" in " ".join(t.get_text() for t in fig.axes[0].texts)

    single = _build_study(url, "single", 4, optimizer="sgd")
    figs = report.build_figures(single)
    assert [t.get_text() for t in figs["importances"].axes[0].get_yticklabels()] == ["lr"]
    assert len(figs["gap_vs_lambda_max"].axes[0].collections[0].get_offsets()) == 4
    assert "slice_rho" not in figs

    bare = optuna.create_study(study_name="bare", storage=url)  # no sharpness stored at all
    bare.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    figs = report.build_figures(bare)
    assert len(figs["gap_vs_lambda_max"].axes[0].collections[0].get_offsets()) == 0
    assert "at least 2" in " ".join(t.get_text() for t in figs["importances"].axes[0].texts)


def assert_tables_render(md: str) -> None:
    """Every markdown table has as many cells in each row as in its header and separator row
    (an unescaped ``|`` inside a cell adds one and breaks the table)."""
    def cells(line: str) -> int:
        return len(re.split(r"(?<!\\)\|", line.strip())) - 2

    tables = re.findall(r"(?m)(?:^\|.*\n)+", md)
    assert tables
    for table in tables:
        lines = table.splitlines()
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[1]), lines[1]
        assert {cells(line) for line in lines} == {cells(lines[1])}, table


def test_run_report_writes_files_prints_table_and_is_read_only(shared, tmp_path, capsys):
    path, url = shared["path"], shared["url"]
    before = _dump(path)
    out = tmp_path / "out"
    report.run_report("sassha", url, out)
    assert _dump(path) == before  # neither study nor trial rows changed
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "val_acc" in printed
    for name in ("gap_vs_lambda_max", "gap_vs_adaptive_sharpness", "pareto", "history", "importances",
                 "slice_lr", "slice_rho"):
        assert (out / f"{name}.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "(gap_vs_lambda_max.png)" in md and "## Config" in md and "## Provenance" in md
    assert "| optuna " in md and "| torch " in md and "| python " in md and re.search(r"\| device\(s\)\s+\| cpu ", md)
    assert "hunter2" not in md and "tuner:***@db.example" in md
    assert "1 running or waiting" in md
    assert_tables_render(md)
    assert "partial given train_loss [CI]" in md


def test_a_report_reads_each_study_once(shared, tmp_path):
    """report.md, report.html, the figures, the correlation, the health and the training spent are
    built from one read of the study's trials (it was 13 reads); compare reads each study once."""
    storage = _CountingStorage(shared["url"])
    written = report.run_report("sassha", storage, tmp_path / "one", echo=lambda _: None)
    assert {p.name for p in written.files} >= {"report.md", "summary.json", "report.html", "importances.png",
                                               "parallel_coordinates.png", "slice_lr.png"}
    assert storage.trial_reads == {"sassha": 1}
    storage = _CountingStorage(shared["url"])
    report.run_compare(["sassha", "sgd-wide", "mo"], storage, tmp_path / "cmp", echo=lambda _: None)
    assert storage.trial_reads == {"sassha": 1, "sgd-wide": 1, "mo": 1}


def test_a_snapshot_holds_the_study_as_read_and_refuses_writes(shared):
    from sassha_tune.report.snapshot import snapshot_study

    live = shared["sgd"]
    storage = _CountingStorage(shared["url"])
    snap = snapshot_study(storage, "sgd-wide")
    assert storage.trial_reads == {"sgd-wide": 1}
    assert [(t.number, t.state, t.params, t.values, t.user_attrs) for t in snap.get_trials()] == [
        (t.number, t.state, t.params, t.values, t.user_attrs) for t in live.get_trials()]
    assert snap.user_attrs == live.user_attrs and snap.directions == live.directions
    assert [t.number for t in snap.get_trials(states=(optuna.trial.TrialState.RUNNING,))] == [8, 9]
    snap.get_trials()
    assert storage.trial_reads == {"sgd-wide": 1}
    with pytest.raises(RuntimeError, match="never writes"):
        snap.set_user_attr("x", 1)


def test_two_objective_study(shared, tmp_path):
    url, study = shared["url"], shared["mo"]
    table = report.best_trials_table(study, width=400)
    assert table.splitlines()[0].split()[-1] == "pareto" and "*" in table
    report.run_report("mo", url, tmp_path / "mo")
    assert "maximize, minimize; the best trial is selected on val_acc, the Pareto front" in (
        tmp_path / "mo" / "report.md").read_text()


def test_empty_study_prints_message_and_writes_report(db, tmp_path, capsys):
    _, url = db
    _build_study(url, "empty", 0, running=1)
    out = tmp_path / "empty"
    report.run_report("empty", url, out)
    assert "no finished trials" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "No finished trials" in md
    assert not list(out.glob("*.png"))


def test_missing_study_lists_available_names(db, tmp_path):
    path, url = db
    _build_study(url, "alpha", 1, optimizer="sgd")
    _build_study(url, "beta", 1, optimizer="sgd")
    with pytest.raises(StorageError, match="study 'gamma' not found.*available studies: alpha, beta") as info:
        report.run_report("gamma", url, tmp_path / "x")
    assert "\n" not in str(info.value)
    missing = tmp_path / "nope.db"
    with pytest.raises(StorageError, match="does not exist"):
        report.run_report("alpha", f"sqlite:///{missing}", tmp_path / "x")
    assert not missing.exists()  # reading never creates a storage


def test_report_masks_every_url_password_in_the_stored_config(db, tmp_path):
    _, url = db
    study = optuna.create_study(study_name="masked", storage=url)
    study.set_user_attr("config", {
        "storage": "postgresql+psycopg://tuner:hunter2@db.example:5432/optuna",
        "mirrors": ["mysql://reader:s3cret@m1/optuna", {"url": "postgresql://bob:pw9@m2/x"}],
    })
    report.run_report("masked", url, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert not {"hunter2", "s3cret", "pw9"} & set(re.findall(r"\w+", md))
    assert "tuner:***@db.example:5432" in md and "reader:***@m1" in md and "bob:***@m2" in md


def test_compare_ranks_known_winner_and_is_read_only(db, tmp_path, capsys):
    path, url = db
    # Same data, model, sampler seed and budget; one search space only holds learning rates too
    # small to move the weights in 6 steps, so its best val accuracy is known to be lower.
    _build_study(url, "timid-sgd", 5, optimizer="sgd", lr=(1e-7, 1e-6))
    _build_study(url, "tuned-sgd", 5, optimizer="sgd", lr=(0.1, 0.5))
    before = _dump(path)
    out = tmp_path / "cmp"
    report.run_compare(["timid-sgd", "tuned-sgd"], url, out)
    assert _dump(path) == before
    ranking = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert [r[1] for r in ranking[:2]] == ["tuned-sgd", "timid-sgd"]
    md = (out / "compare.md").read_text()
    assert md.index("| 1      | tuned-sgd") < md.index("| 2      | timid-sgd")
    per_optimizer = md.split("## Per optimizer over independent studies")[1].split("##")[0]
    assert "| sgd " in per_optimizer and "| 2 " in per_optimizer  # two SGD studies: median and IQR
    assert "Single-seed results overstate" in md  # no re-runs yet
    assert_tables_render(md)
    for name in ("best_vs_trials", "best_vs_seconds", "final_sharpness", "gap_vs_lambda_max"):
        assert (out / f"{name}.png").stat().st_size > 0


def test_compare_warns_when_a_study_ranks_on_few_trained_trials(shared, db, tmp_path, capsys):
    """Two trials cannot say which optimizer is better: the ranking says so for that study only."""
    _, url = db
    _build_study(url, "two-sgd", 2, optimizer="sgd", lr=(0.1, 0.5))
    _build_study(url, "ten-sassha", 10)
    report.run_compare(["two-sgd", "ten-sassha"], url, tmp_path / "cmp")
    printed = capsys.readouterr().out
    md = (tmp_path / "cmp" / "compare.md").read_text()
    caveat = "ranks on 2 trained trials (fewer than 5): its place says little about the optimizer"
    assert f"**Caveat.** `two-sgd` (sgd) {caveat}" in md
    assert f"caveat: two-sgd (sgd) {caveat}" in printed
    assert "`ten-sassha`" not in md.split("**Caveat.**", 1)[1].split("##")[0]
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert len(summary["caveats"]) == 1 and summary["caveats"][0].startswith("`two-sgd`")


def test_compare_figures_curves_bands_and_sharpness(shared):
    a, b = shared["sassha"], shared["sgd"]
    n_complete_b = sum(t.state == optuna.trial.TrialState.COMPLETE for t in b.trials)
    figs = report.compare_figures([a, b])
    by_trials = figs["best_vs_trials"].axes[0]
    assert by_trials.get_xlabel() == "number of trials (budget)"
    assert by_trials.get_ylabel() == "best validation accuracy so far"
    assert [len(line.get_xdata()) for line in by_trials.lines] == [10, 8]  # failures count, RUNNING ignored
    assert len(by_trials.collections) == 2  # one bootstrap band per study
    best_a = max(t.values[0] for t in a.trials if t.values)
    assert by_trials.lines[0].get_ydata()[-1] == pytest.approx(best_a)
    assert "train seconds" in figs["best_vs_seconds"].axes[0].get_xlabel()
    bars = figs["final_sharpness"].axes[0].patches
    best = [max((t for t in s.trials if t.values), key=lambda t: (t.values[0], -t.number)) for s in (a, b)]
    assert [p.get_height() for p in bars] == pytest.approx([t.user_attrs["lambda_max"] for t in best])
    gap = figs["gap_vs_lambda_max"].axes[0]
    assert [len(c.get_offsets()) for c in gap.collections] == [10, n_complete_b]
    again = report.compare_figures([a, b])["best_vs_trials"].axes[0]
    assert (again.collections[0].get_paths()[0].vertices == by_trials.collections[0].get_paths()[0].vertices).all()


def test_compare_seed_reruns_table(db, tmp_path):
    _, url = db
    base = _build_study(url, "s", 4)
    best = max((t for t in base.trials if t.values), key=lambda t: t.values[0])
    seeds = optuna.create_study(study_name="s-seeds", storage=url)
    for seed in range(3):
        metrics = _trained_attrs("sassha", best.params, seed=100 + seed)
        seeds.add_trial(optuna.trial.create_trial(
            value=metrics["val_acc"], params=best.params, distributions=best.distributions,
            user_attrs={**metrics, "seed": seed}))
    other = _build_study(url, "t", 4, optimizer="sgd")
    t_best = max((t for t in other.trials if t.values), key=lambda t: t.values[0])
    metrics = _trained_attrs("sgd", t_best.params, seed=7)
    other.add_trial(optuna.trial.create_trial(
        value=metrics["val_acc"], params=t_best.params, distributions=t_best.distributions,
        user_attrs={**metrics, report.SEED_RERUN_ATTR: t_best.number}))
    out = tmp_path / "cmp"
    report.run_compare(["s", "s-seeds", "t"], url, out)
    md = (out / "compare.md").read_text()
    ranking = md.split("## Ranking")[1].split("##")[0]
    assert "s-seeds" not in ranking  # a seeds study is not a competitor
    assert "| t " in ranking and "| 4 " in ranking  # the re-run is not counted as a search trial
    reruns = md.split("## Best configs re-run over seeds")[1].split("##")[0]
    assert "±" in reruns and "| s " in reruns and f"| {t_best.number} " in reruns
    assert "| 3 " in reruns  # three seeds
    storage = _CountingStorage(url)
    report.run_report("s", storage, tmp_path / "s", echo=lambda _: None)
    assert storage.trial_reads == {"s": 1, "s-seeds": 1}  # the study and its re-runs' companion, once each
    single = (tmp_path / "s" / "report.md").read_text()
    assert "## Best config re-run over seeds" in single and "±" in single


def test_compare_missing_study(db, tmp_path):
    _, url = db
    _build_study(url, "a", 1, optimizer="sgd")
    with pytest.raises(StorageError, match="study 'zzz' not found.*available studies: a"):
        report.run_compare(["a", "zzz"], url, tmp_path / "c")
