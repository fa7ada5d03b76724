"""Notes for a valid config that is likely to waste trials (printed by ``run``, never fatal)."""

from __future__ import annotations

from .schema import Config

__all__ = ["advice"]


def advice(cfg: Config) -> list[str]:
    """Notes for a valid config: the search space chosen for a model without normalization, and
    settings that are likely to waste trials (printed by ``run``, never fatal)."""
    from .spaces import default_space_name

    notes = []
    name, fixed = cfg.optimizer.name, cfg.optimizer.fixed
    space = cfg.optimizer.search_space
    chosen = default_space_name(cfg) if space is None else None
    if chosen is not None and chosen != name:
        notes.append(
            f"{cfg.task.model} has no normalization layers: searching the {chosen} space instead of {name}'s "
            "own (its published configurations diverge on such models; docs/optimizer.md). Name a "
            "search_space to choose yourself"
        )
        return notes
    # Measured (docs/optimizer.md, "Dense start and eps on models without normalization"; the
    # MNIST-1D reproduction in docs/results.md): lazy Hessian refreshes on such models diverge or
    # collapse in many trials unless the first steps refresh densely.
    lazy_on_plain_model = (
        (space is None or space == name) and "dense_refresh_steps" not in fixed and cfg.model_normalized is False
    )
    if not lazy_on_plain_model:
        return notes
    if name == "sassha":
        notes.append(
            f"sassha on {cfg.task.model}, a model without normalization layers: with the default sassha space "
            "many trials diverge in their first steps; search_space: sassha_nonorm (dense Hessian start, "
            "eps >= 1e-4) avoids that (docs/optimizer.md)"
        )
    elif name == "adahessian":
        notes.append(
            f"adahessian on {cfg.task.model}, a model without normalization layers: lazy Hessian refreshes "
            "diverge in some trials; optimizer.fixed: {dense_refresh_steps: 50} cut that from 6 to 1 of 16 "
            "on MNIST-1D (docs/results.md)"
        )
    return notes
