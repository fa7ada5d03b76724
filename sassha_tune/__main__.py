"""``python -m sassha_tune``: the command line, as the ``sassha-tune`` entry point."""

from .app.cli import app

app(prog_name="sassha-tune")
