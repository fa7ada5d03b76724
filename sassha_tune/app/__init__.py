"""The application layer: what a user calls, on top of everything else.

:mod:`~sassha_tune.app.api` holds the commands as Python functions (``run_study``,
``resume_study``, ``export``, ...; the package's public names load them from there);
:mod:`~sassha_tune.app.cli` is the ``sassha-tune`` command line, thin Typer commands that parse
their arguments, call the API and print what it returns; :mod:`~sassha_tune.app.live` draws a
running study on a terminal for the CLI. Nothing below this layer imports it.
"""
