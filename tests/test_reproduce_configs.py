"""The reproduction study's configs (benchmarks/reproduce/<part>/*.yaml) are valid and, within a
part, give every optimizer the same task, budget, schedule, sampler and sharpness protocol."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sassha_tune.config import load_config

PARTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "reproduce"
PARTS = sorted(p.name for p in PARTS_DIR.iterdir() if p.is_dir() and list(p.glob("*.yaml")))


def test_the_parts_are_there():
    assert {"mnist1d", "mnist1d_noise40", "mnist1d_dense", "fashion", "noise40"} <= set(PARTS)


@pytest.mark.parametrize("part", PARTS)
def test_part_configs_share_the_protocol(part):
    cfgs = [load_config(p) for p in sorted((PARTS_DIR / part).glob("*.yaml"))]
    names = [c.study.name for c in cfgs]
    assert len(set(names)) == len(names), "every optimizer needs its own study"
    # one study per optimizer, or per (optimizer, search space) where a part compares spaces
    assert len({(c.optimizer.name, str(c.optimizer.search_space)) for c in cfgs}) == len(cfgs)
    first = cfgs[0]
    for c in cfgs[1:]:
        for section in ("task", "budget", "schedule", "metrics", "device"):
            assert dataclasses.asdict(getattr(c, section)) == dataclasses.asdict(getattr(first, section)), (
                f"{c.source}: {section} differs from {first.source}"
            )
        assert c.study.sampler == first.study.sampler and c.study.objectives == first.study.objectives
        assert c.study.storage == first.study.storage and c.seed == first.seed


@pytest.mark.parametrize("part", [p for p in PARTS if p.endswith("_dense")])
def test_dense_parts_change_only_the_sassha_space_and_the_dense_start(part):
    """A follow-up part repeats its base part; only SASSHA's space and the dense start may change."""
    base = part.removesuffix("_dense")
    for path in sorted((PARTS_DIR / part).glob("*.yaml")):
        new, old = load_config(path), load_config(PARTS_DIR / base / path.name)
        assert new.study.name != old.study.name
        for section in ("task", "budget", "schedule", "metrics", "device"):
            assert dataclasses.asdict(getattr(new, section)) == dataclasses.asdict(getattr(old, section))
        assert new.study.sampler == old.study.sampler and new.seed == old.seed
        assert new.optimizer.name == old.optimizer.name
        if new.optimizer.search_space != old.optimizer.search_space:
            assert (new.optimizer.name, new.optimizer.search_space) == ("sassha", "sassha_nonorm")
        assert {k: v for k, v in new.optimizer.fixed.items() if k != "dense_refresh_steps"} == old.optimizer.fixed


def test_language_model_comparison_shares_the_protocol():
    """benchmarks/lm_compare: every optimizer gets the same task, budget, schedule, clipping, sampler
    and sharpness protocol; only the optimizer, its language-model space and its fixed betas differ."""
    cfgs = [load_config(p) for p in sorted((PARTS_DIR.parent / "lm_compare").glob("*.yaml"))]
    assert {c.optimizer.name for c in cfgs} == {"sassha_lm", "adamw", "sam_adamw", "sophiah"}
    first = cfgs[0]
    for c in cfgs:
        assert c.task.dataset == "text" and c.study.metrics == ["val_ppl"] and c.optimizer.grad_clip == 1.0
        assert str(c.optimizer.search_space).endswith("_lm") and c.optimizer.enqueue_published is True
        for section in ("task", "budget", "schedule", "metrics", "device"):
            assert dataclasses.asdict(getattr(c, section)) == dataclasses.asdict(getattr(first, section)), c.source
        assert c.study.sampler == first.study.sampler and c.seed == first.seed
