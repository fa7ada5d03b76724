"""The warm trial worker's reset between jobs (sassha_tune/trial/child.py, ``_FreshState``), in this
process: what the collector keeps and drops, and the deterministic-algorithms setting put back
exactly when a job changed it. (The whole worker, through real studies: tests/trial/test_user_train.py
and tests/study/test_warm_workers.py.)"""

import gc
import weakref

import pytest
import torch

from sassha_tune.trial.child import _FreshState


class _Node:
    """An object that can sit in a reference cycle and be watched through a weak reference."""


@pytest.fixture
def fresh_state():
    """A ``_FreshState`` of this process; the collector's freeze undone and its automatic runs back
    on afterwards (the test turns them off so that only ``restore`` collects)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield _FreshState()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def test_restore_collects_the_jobs_cyclic_garbage_then_freezes_what_survives(fresh_state):
    job_garbage = _Node()
    job_garbage.cycle = job_garbage
    dropped = weakref.ref(job_garbage)
    survivor = _Node()  # e.g. a module-level cache: alive when restore runs
    survivor.cycle = survivor
    kept = weakref.ref(survivor)
    del job_garbage

    fresh_state.restore()
    assert dropped() is None  # collected before the freeze, not frozen with the survivors

    del survivor  # a survivor's cycle dying later: frozen, the collector no longer walks it
    gc.collect()
    assert kept() is not None
    gc.unfreeze()  # the trade-off is only the freeze's: unfrozen, it goes at the next collection
    gc.collect()
    assert kept() is None


@pytest.mark.parametrize("changed", [(True, False), (True, True), (False, True)])
def test_restore_puts_back_deterministic_algorithms_a_job_changed(fresh_state, changed):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(changed[0], warn_only=changed[1])
        fresh_state.restore()
        assert (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) == before
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
