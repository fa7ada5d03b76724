"""sassha-tune: tune the SASSHA optimizer (and compare it with its peers) with Optuna studies."""

__version__ = "0.1.0"
