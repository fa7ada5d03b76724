"""The ``sassha-tune`` command line (Typer). Thin: parse, call, print. It calls only the app layer
(the commands as Python functions: :mod:`~sassha_tune.app.api`, :mod:`~sassha_tune.app.starter`,
:mod:`~sassha_tune.app.results`; the flags checked as typed: :mod:`~sassha_tune.app.flags`; what
``status`` and ``train`` show: :mod:`~sassha_tune.app.status`, :mod:`~sassha_tune.app.train`),
never the packages below it.

A :class:`~sassha_tune.errors.UserError` becomes one red line on stderr and exit code 2; so does a
usage error Typer finds (unknown option, ``--worker-id x``, a missing argument, ...), instead of a
boxed usage panel (:class:`_OneLineErrors`). ``--help`` is unchanged.
Ctrl-C (and SIGTERM or SIGHUP while trials run) exits with 130 after the running trial is marked ``interrupted``. ``run``, ``resume`` and
``worker`` show a live view of the study on a terminal (:mod:`sassha_tune.app.live`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import math
import signal
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from ..errors import UserError
from ..printable import printable
from .flags import Flags, check_flags
from .outputs import check_output, write_output

# Piped output (logs, CI) is not squeezed into 80 columns; a terminal keeps its own width.
out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, emoji=False)


class _OneLineErrors(TyperGroup):
    """The app's command group: a usage error is ``error: <message>`` on one line, exit code 2.

    Runs Typer with ``standalone_mode=False`` and prints the usage errors itself, so both the
    console script (``sassha_tune.app.cli:app``) and ``CliRunner().invoke(app, ...)`` get one line."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        _no_collector_passes_at_exit()
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's ClickException / UsageError / BadParameter
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `sassha-tune`: Typer printed the help
                sys.exit(2)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            err.print(f"[red]error:[/red] {_shown(message)}{_shown(hint)}", soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2) or 2)
        except typer.Abort:
            err.print("[yellow]aborted[/yellow]")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


_freeze_at_exit: list[bool] = []


def _no_collector_passes_at_exit() -> None:
    """When the process exits, the interpreter tears its modules down with garbage-collector passes
    over every object left (with torch, Optuna and SQLAlchemy loaded about 270,000: 0.55 s on 2
    cores, which the shell waits for; 0.15 s with this). ``gc.freeze()`` as an exit handler takes
    the objects out of those passes. It runs after the handlers registered later (atexit runs them
    last in, first out: a tracker's, which finishes its run), and by then the command has
    committed what it stored and closed what it wrote. Until the exit a Python process that calls
    the app keeps its collector as it was."""
    if not _freeze_at_exit:
        atexit.register(gc.freeze)
        _freeze_at_exit.append(True)


class _NoFlagTypes:
    """Flags (``--create-only``, ``--help``) show no type in ``--help``: Typer's rich help would
    print ``<bool>`` beside them, as if they took a value."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_NoFlagTypes, TyperCommand):
    """Every command of the app (:class:`_NoFlagTypes`)."""


class _App(_NoFlagTypes, _OneLineErrors):
    """The app's group: one-line usage errors (:class:`_OneLineErrors`), flags without a type."""


def _examples(*lines: str) -> str:
    """A command's ``--help`` epilog: its examples, one per line, their ``#`` comments aligned."""
    split = [(cmd.rstrip(), comment.strip()) for cmd, _, comment in (line.partition("  #") for line in lines)]
    width = max(len(cmd) for cmd, comment in split if comment) if any(c for _, c in split) else 0
    return "\b\nExamples:\n" + "\n".join(
        f"  {cmd.ljust(width)}  # {comment}" if comment else f"  {cmd}" for cmd, comment in split)


app = typer.Typer(
    name="sassha-tune",
    help="Tune SASSHA (and its peers) with crash-safe, resumable Optuna studies.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=_App,
)


def main() -> None:
    """Console-script entry point (same as ``app()``)."""
    app()


def _print_version(value: bool) -> None:
    if value:
        from ..version import __version__

        out.print(f"sassha-tune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Tune SASSHA (and its peers) with crash-safe, resumable Optuna studies."""

F = TypeVar("F", bound=Callable[..., Any])


class ExportFormat(str, Enum):
    yaml = "yaml"
    json = "json"
    kwargs = "kwargs"


StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="SQLAlchemy database URL of the studies (default: study.storage of the config, else "
        "sqlite:///sassha-tune.db in the working directory). Also read from $SASSHA_TUNE_STORAGE.",
        envvar="SASSHA_TUNE_STORAGE",
        show_envvar=False,
    ),
]
# the commands that name a study rather than a config: no config to take the storage from
StudyStorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="SQLAlchemy database URL of the studies (default: sqlite:///sassha-tune.db in the working "
        "directory). Also read from $SASSHA_TUNE_STORAGE.",
        envvar="SASSHA_TUNE_STORAGE",
        show_envvar=False,
    ),
]
StudyArg = Annotated[str, typer.Argument(help="Name of a study in the storage.", show_default=False)]
ConfigArg = Annotated[
    Path, typer.Argument(help="The study's YAML config (see docs/config.md).", show_default=False)
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", metavar="[auto|cpu|cuda|cuda:N]", help="Override the config's device."),
]
NTrialsOpt = Annotated[
    str | None,
    typer.Option("--n-trials", metavar="N|+N", help="Set the study's total budget (all runs, resumes and workers "
                 "together) to N, or raise it by N with +N. Below the trials already counted it is refused."),
]
PackOpt = Annotated[
    str,
    typer.Option(
        "--pack",
        help="Trials trained together in one process: auto (by model, batch size and free GPU memory; "
        "1 on the CPU), an integer K, or 1 (one at a time). See docs/packs.md.",
    ),
]
FreshOpt = Annotated[
    bool,
    typer.Option("--fresh-process", help="A fresh trial process for every trial, instead of one long-lived "
                 "trial worker running single trials one after another (replaced after a failure). "
                 "Same as study.fresh_process: true."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY.PATH=VALUE",
                 help="Override one key of the config, e.g. --set task.epochs=3 (repeatable). The value is YAML "
                 "and is checked like the file's; the study stores the config with it."),
]
GpusOpt = Annotated[
    str | None,
    typer.Option("--gpus", help="Comma-separated GPU indices, e.g. 0,1: one worker process per GPU."),
]


def _shown(text: Any) -> str:
    """Text that did not come from this module (a study name, a plug-in's or an exception's
    message) for the consoles: control characters shown (:func:`~sassha_tune.printable.printable`),
    rich markup escaped."""
    return escape(printable(text))


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {_shown(message)}", soft_wrap=True)
    return typer.Exit(code)


def _quiet_optuna() -> None:
    """Optuna's INFO lines (a study created, each trial told) would interleave with the command's
    own log; the command says what happened itself. Set per command, never on import, so that a
    Python user of the package keeps Optuna's logging as they configured it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def handle_errors(fn: F) -> F:
    """Every command: Optuna's INFO log off; UserError -> one red line, exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_optuna()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise _fail(str(exc), getattr(exc, "exit_code", 2)) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP during trials (its name in exc)
            # the running trial is marked already; a further Ctrl-C would only interrupt the exit
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) takes no line
                err.print("[yellow]interrupted[/yellow]" + (f" ({_shown(exc)})" if str(exc) else ""))
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a storage fault (corrupt, read-only, full, locked): one line
            from .base import storage_fault_line

            message = storage_fault_line(exc)
            if message is None:
                raise
            raise _fail(message) from None

    return wrapper  # type: ignore[return-value]


def _log(message: str) -> None:
    out.print(_shown(message), soft_wrap=True)


@contextlib.contextmanager
def _study_view(flags: Flags) -> Iterator[Any]:
    """The observer of the trials this process runs: the live view (:mod:`sassha_tune.app.live`;
    None with ``--gpus``, whose workers each show their own). A failed GPU worker printed why
    itself: exit with its code, without another line."""
    from .api import WorkersFailed
    from .live import study_view

    try:
        with study_view(out) as view:
            yield None if flags.gpus else view
    except WorkersFailed as exc:
        raise typer.Exit(exc.exit_code) from None


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune init  # writes study.yaml',
    'sassha-tune init --out mine.yaml --dataset digits --optimizer adamw',
    'sassha-tune init --out loop.yaml --own-loop  # also loop_train.py',
    'sassha-tune init --out c10.yaml --dataset cifar10 --data-dir data',
))
@handle_errors
def init(
    out_file: Annotated[
        Path, typer.Option("--out", help="The config to write (the study is named after it); never overwritten.",
                           dir_okay=False),
    ] = Path("study.yaml"),
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", help="A built-in dataset: mnist1d (the default), digits, synthetic, or with "
                     "--data-dir fashion_mnist, cifar10, cifar100, text."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="A built-in model (default: one that fits the dataset) or your "
                     "package.module:factory."),
    ] = None,
    optimizer: Annotated[
        str, typer.Option("--optimizer", help="The optimizer to tune (sassha, msassha, sgd, adamw, sam_sgd, ...).")
    ] = "sassha",
    own_loop: Annotated[
        bool,
        typer.Option("--own-loop", help="Tune inside your own training function: also writes <name>_train.py "
                     "(a train(reporter) to edit) beside the config."),
    ] = False,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="Where a file-based dataset's files are (written as task.data_dir).")
    ] = None,
) -> None:
    """Write a commented starter config that runs as is (and with --own-loop a training module)."""
    from .starter import init_config

    written = init_config(out_file, dataset=dataset, model=model, optimizer=optimizer, own_loop=own_loop,
                          data_dir=data_dir, log=_log)
    prefix = "PYTHONPATH=. " if own_loop else ""
    _log(f"next: {prefix}sassha-tune run {written[-1]}")


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune run study.yaml',
    'sassha-tune run study.yaml --set task.epochs=2 --set budget.n_trials=4',
    'sassha-tune run study.yaml --n-trials +10',
    'sassha-tune run study.yaml --storage "$DB_URL" --create-only',
    'sassha-tune run study.yaml --gpus 0,1',
))
@handle_errors
def run(
    config: ConfigArg,
    storage: StorageOpt = None,
    allow_space_change: Annotated[
        bool,
        typer.Option("--allow-space-change", help="Continue an existing study even though its search space changed."),
    ] = False,
    gpus: GpusOpt = None,
    n_trials: NTrialsOpt = None,
    device: DeviceOpt = None,
    create_only: Annotated[
        bool,
        typer.Option("--create-only", help="Create (or check) the study and exit; run trials with `worker`."),
    ] = False,
    pack: PackOpt = "auto",
    fresh_process: FreshOpt = False,
    set_: SetOpt = None,
) -> None:
    """Create the study a config describes (or continue it) and run trials until its budget is spent."""
    from .api import run_study

    flags = check_flags(n_trials=n_trials, gpus=gpus, device=device, pack=pack, overrides=set_)  # named as typed
    with _study_view(flags) as observer:
        run_study(config, storage=storage, n_trials=flags.budget, device=device, pack=flags.pack, gpus=flags.gpus,
                  allow_space_change=allow_space_change, create_only=create_only, log=_log, fresh_process=fresh_process,
                  observer=observer, overrides=set_ or ())


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune resume quickstart',
    'sassha-tune resume quickstart --n-trials 20',
    'sassha-tune resume quickstart --set study.keep_models=best',
))
@handle_errors
def resume(
    study: StudyArg,
    storage: StudyStorageOpt = None,
    n_trials: NTrialsOpt = None,
    gpus: GpusOpt = None,
    device: DeviceOpt = None,
    pack: PackOpt = "auto",
    fresh_process: FreshOpt = False,
    set_: SetOpt = None,
) -> None:
    """Continue a study from its stored config: lost trials are failed and retried, the budget is finished."""
    from .api import resume_study

    flags = check_flags(n_trials=n_trials, gpus=gpus, device=device, pack=pack, overrides=set_)
    with _study_view(flags) as observer:
        resume_study(study, storage=storage, n_trials=flags.budget, device=device, pack=flags.pack, gpus=flags.gpus,
                     log=_log, fresh_process=fresh_process, observer=observer, overrides=set_ or ())


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune worker quickstart  # $SASSHA_TUNE_STORAGE: the database',
    'sassha-tune worker quickstart --device cuda:1 --worker-id 1',
))
@handle_errors
def worker(
    study: StudyArg,
    storage: StudyStorageOpt = None,
    device: DeviceOpt = None,
    worker_id: Annotated[
        int | None,
        typer.Option("--worker-id", help="Number mixed into the sampler seed (default: the process id)."),
    ] = None,
    pack: PackOpt = "auto",
    fresh_process: FreshOpt = False,
    set_: SetOpt = None,
) -> None:
    """Join an existing study (e.g. on PostgreSQL from another machine) and run trials until its budget is spent."""
    from .api import run_worker

    flags = check_flags(device=device, pack=pack, overrides=set_)
    with _study_view(flags) as observer:
        run_worker(study, storage=storage, worker_id=worker_id, device=device, pack=flags.pack, log=_log,
                   fresh_process=fresh_process, observer=observer, overrides=set_ or ())


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune rerun quickstart --seeds 1,2,3  # the best trial',
    'sassha-tune rerun quickstart --seeds 1,2,3 --trial 7',
    'sassha-tune report quickstart  # mean, spread, 95% interval',
))
@handle_errors
def rerun(
    study: StudyArg,
    seeds: Annotated[
        str, typer.Option("--seeds", help="Comma-separated training seeds, e.g. 1,2,3 (seed 0 is usually the one "
                          "the search selected on).", show_default=False),
    ],
    trial: Annotated[
        int | None, typer.Option("--trial", min=0, help="Re-run this trial number instead of the best one.")
    ] = None,
    storage: StudyStorageOpt = None,
    device: DeviceOpt = None,
    fresh_process: FreshOpt = False,
) -> None:
    """Re-run the best configuration (or --trial N) over training seeds, in the study <STUDY>-seeds.

    The re-runs are trials of the companion study, run by the study loop: crash-safe and resumable
    (run it again: only the seeds without a re-run run). report and compare show their mean, spread
    and 95% interval."""
    from .api import rerun_study

    flags = check_flags(seeds=seeds, device=device)  # named as typed
    with _study_view(flags) as observer:
        rerun_study(study, seeds, trial=trial, storage=storage, device=device, log=_log, fresh_process=fresh_process,
                    observer=observer)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune status',
    'sassha-tune status quickstart --storage sqlite:///other.db',
))
@handle_errors
def status(
    study: Annotated[str | None, typer.Argument(help="A study to show in detail (default: list all studies).")] = None,
    storage: StudyStorageOpt = None,
) -> None:
    """Show the studies in a storage (trial counts by state, budget, best value) or one study in detail."""
    if study is None:
        _show_studies(storage)
    else:
        _show_study(study, storage)


_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def _show_studies(storage: str | None) -> None:
    from .status import list_studies

    listing = list_studies(storage)
    if not listing.rows:
        _log(f"no studies in {listing.storage}")
        return
    table = Table(title=f"studies in {_shown(listing.storage)}")
    for col in ("study", "optimizer", "objectives", *_STATES, "budget", "best"):
        table.add_column(col)
    for r in listing.rows:
        best = r["best"]
        table.add_row(
            _shown(r["name"]), _shown(r["optimizer"]), _shown(", ".join(map(str, r["objectives"]))),
            *(str(r["counts"].get(s, 0)) for s in _STATES),
            _shown(r["budget"]), ", ".join(_fmt(v) for v in best.values) if best is not None else "-",
        )
    out.print(table)


def _show_study(study: str, storage: str | None) -> None:
    from .status import study_status

    status = study_status(study, storage)
    d = status.detail
    table = Table(title=_shown(f"study {study} ({d['optimizer']}; {', '.join(map(str, d['objectives']))})"))
    table.add_column("state")
    table.add_column("trials", justify="right")
    for state in _STATES:
        table.add_row(state, str(d["counts"].get(state, 0)))
        for label, count in status.health.get(state, []):
            table.add_row(f"  {_shown(label)}", count)
    table.add_row("budget used", _shown(d["budget"]))
    out.print(table)
    _log(status.spent)  # where the training went: what the search cost
    # The table splits failures by kind; the full reasons of `error: ...` failures only here.
    details = {k: v for k, v in d["failures"].items() if ":" in k}
    if details:
        _log("failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(details.items())))
    if d["best"] is None:
        _log("no complete trial yet")
        return
    bt = Table(title=f"best trial {d['best'].number}")
    bt.add_column("key")
    bt.add_column("value")
    for label, value in status.best_rows:
        bt.add_row(_shown(label), _shown(_fmt(value)))
    out.print(bt)


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune export quickstart --out best.yaml  # for train',
    'sassha-tune export quickstart --format kwargs  # optimizer arguments',
    'sassha-tune export quickstart --trial 3 --format json',
    'sassha-tune export quickstart --model --out best.pt  # its kept model',
))
@handle_errors
def export(
    study: StudyArg,
    storage: StudyStorageOpt = None,
    format: Annotated[
        ExportFormat,
        typer.Option("--format", help="yaml or json: the config with the trial's params fixed (for `train`); "
                     "kwargs: the optimizer's class and constructor arguments, as JSON (for your own loop)."),
    ] = ExportFormat.yaml,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of stdout.", dir_okay=False)
    ] = None,
    trial: Annotated[
        int | None, typer.Option("--trial", help="Export this trial number instead of the best one.")
    ] = None,
    model: Annotated[
        bool, typer.Option("--model", help="Write the trial's kept model file to --out instead (study.keep_models; "
                           "torch.load(path, weights_only=True) reads it: docs/workflow.md).")
    ] = False,
) -> None:
    """Write the best trial's config (or its optimizer's arguments, or its kept model).

    The config is the study's with the trial's params fixed (`sassha-tune train` runs it as is);
    --format kwargs gives the optimizer's class and constructor arguments; --model the trained
    weights the study kept (study.keep_models)."""
    from .results import export as export_study
    from .results import export_text

    if model:
        if out_file is None:
            raise UserError("--model: give --out FILE (a model file is binary)")
        check_output(out_file, "--out")
        export_study(study, storage=storage, trial=trial, out=out_file, model=True)
        _log(f"wrote the model of {f'trial {trial}' if trial is not None else 'the best trial'} of {study} to {out_file}")
        return
    if out_file is not None:
        check_output(out_file, "--out", directory=False)
    d = export_study(study, storage=storage, trial=trial, format=format.value)
    assert isinstance(d, dict)
    if out_file is None:
        sys.stdout.write(export_text(d, format.value))  # YAML and JSON show control characters as escapes
    else:
        write_output(out_file, export_text(d, format.value), "--out")
        _log(f"wrote trial {d['provenance']['trial']} of {study} to {out_file}")


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune train best.yaml',
    'sassha-tune train best.yaml --seed 1 --metrics-out seed1.json',
    'sassha-tune train best.yaml --set task.epochs=20 --save best.pt',
))
@handle_errors
def train(
    config: ConfigArg,
    params: Annotated[
        Path | None,
        typer.Option("--params", help="YAML/JSON mapping of hyperparameters (config convention) over optimizer.fixed.",
                     dir_okay=False),
    ] = None,
    device: DeviceOpt = None,
    metrics_out: Annotated[
        Path | None, typer.Option("--metrics-out", help="Also write the metrics as JSON to this file.", dir_okay=False)
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", min=0, help="Override the config's seed (data split, initialization, data order, "
                     "probes) to re-run a configuration over seeds; the sharpness protocol keeps metrics.seed."),
    ] = None,
    set_: SetOpt = None,
    save: Annotated[
        Path | None,
        typer.Option("--save", help="Write the trained model (its state dict, the config that made it, its "
                     "metrics) to this file; torch.load(path, weights_only=True) reads it.", dir_okay=False),
    ] = None,
) -> None:
    """Train once with the config's fixed hyperparameters (e.g. an exported config) and print the metrics."""
    from .train import train_once, write_metrics

    check_flags(device=device)
    ran = train_once(config, params=params, device=device, seed=seed, overrides=set_ or (), save=save,
                     metrics_out=metrics_out, log=_log)
    outcome = ran.outcome
    table = Table(title=_shown(f"{ran.optimizer} on {ran.task}: {outcome.state}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in outcome.attrs.items():
        if isinstance(v, (int, float, str)) or v is None:
            table.add_row(_shown(k), _shown(_fmt(v)))
    if outcome.failure_reason:
        table.add_row("failure_reason", _shown(outcome.failure_reason))
    out.print(table)
    if metrics_out is not None:
        write_metrics(metrics_out, outcome)
    if save is not None:
        _log(f"wrote the model to {save}" if outcome.state == "complete" else
             f"no model written to {save}: the run ended {outcome.state}")
    if outcome.state == "fail":
        raise typer.Exit(1)


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune report quickstart --out reports/quickstart',
))
@handle_errors
def report(
    study: StudyArg,
    storage: StudyStorageOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for report.md, summary.json, report.html and the "
                                          "PNG figures.", file_okay=False)] = Path("report"),
) -> None:
    """Write a report of one study: does flatness predict generalization here?

    Prints the best trials and the verdict, and writes to --out: report.md (the verdict, the
    correlation table, where the budget went, the best trials, the seed re-runs with their 95%
    interval, the figures, provenance), summary.json (the same numbers as data), report.html (one
    self-contained interactive page: our figures and Optuna's) and PNG figures: gap_vs_lambda_max,
    gap_vs_adaptive_sharpness, pareto, history, best_vs_training, importances, learning_curves,
    params_vs_lambda_max, parallel_coordinates, slice_<param> (for each of lr, rho,
    lazy_hessian, eps that was searched) and sharpness_during_training (when measured). See
    docs/reports.md."""
    from .results import write_report

    write_report(study, storage=storage, out=out_dir, echo=print)


@app.command(cls=_Command, epilog=_examples(
    'sassha-tune compare sgd-study sassha-study --out reports/compare',
))
@handle_errors
def compare(
    studies: Annotated[list[str], typer.Argument(help="Two or more study names (e.g. one per optimizer).")],
    storage: StudyStorageOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for compare.md, summary.json, compare.html and the "
                                          "PNG figures.", file_okay=False)] = Path("compare"),
) -> None:
    """Compare studies under equal budgets: best-so-far curves by trials and by seconds, ranking, sharpness.

    Prints the ranking and writes to --out: compare.md (ranking, sharpness over trained trials,
    per optimizer, seed re-runs with their 95% interval, figures, provenance), summary.json,
    compare.html (the same tables and figures in one self-contained page) and PNG figures:
    best_vs_trials, best_vs_seconds, final_sharpness, gap_vs_lambda_max. See docs/reports.md."""
    from .results import write_comparison

    write_comparison(studies, storage=storage, out=out_dir)


if __name__ == "__main__":
    app()
