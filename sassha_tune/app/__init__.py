"""The application layer: what a user calls, on top of everything else.

The commands as Python functions: :mod:`~sassha_tune.app.api` (``run_study``, ``resume_study``,
``rerun_study``, ``run_worker``), :mod:`~sassha_tune.app.starter` (``init_config``) and
:mod:`~sassha_tune.app.results` (``export``, ``write_report``, ``write_comparison``,
``trials_dataframe``); the package's public names load them from there. What they share is in
:mod:`~sassha_tune.app.base` (the ``log`` of progress lines, a storage fault as one line). For the
command line: :mod:`~sassha_tune.app.flags` (its flags checked as typed), :mod:`~sassha_tune.app.status` and
:mod:`~sassha_tune.app.train` (what ``status`` and ``train`` show), :mod:`~sassha_tune.app.outputs`
(the files a command writes) and :mod:`~sassha_tune.app.live` (a running study drawn on a
terminal). :mod:`~sassha_tune.app.cli`, the ``sassha-tune`` command line, is thin Typer commands
that parse their arguments, call these and print what they return. Nothing below this layer
imports it.
"""
