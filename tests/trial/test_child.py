"""The warm trial worker's reset between jobs (sassha_tune/trial/child.py, ``_FreshState``): what
the collector keeps and drops, and the deterministic-algorithms setting put back exactly when a job
changed it. Each check runs in a fresh process, as the worker does: this one's torch settings are
the earlier tests'. (The whole worker, through real studies: tests/trial/test_user_train.py and
tests/study/test_warm_workers.py.)"""

from __future__ import annotations

import pytest
from conftest import in_fresh_process


def _run(body: str) -> None:
    in_fresh_process("import gc, weakref, torch\nfrom sassha_tune.trial.child import _FreshState\n" + body)


def test_restore_collects_the_jobs_cyclic_garbage_then_freezes_what_survives():
    _run(
        "class Node: pass\n"
        "fresh = _FreshState()\n"
        "gc.disable()  # only restore collects\n"
        "job_garbage = Node(); job_garbage.cycle = job_garbage; dropped = weakref.ref(job_garbage)\n"
        "survivor = Node(); survivor.cycle = survivor; kept = weakref.ref(survivor)  # e.g. a cache\n"
        "del job_garbage\n"
        "fresh.restore()\n"
        "assert dropped() is None, 'the job garbage was frozen, not collected'\n"
        "del survivor  # a survivor's cycle dying later: frozen, the collector no longer walks it\n"
        "gc.collect()\n"
        "assert kept() is not None, 'the survivors were not frozen'\n"
        "gc.unfreeze(); gc.collect()  # the trade-off is only the freeze's\n"
        "assert kept() is None\n"
    )


@pytest.mark.parametrize("changed", [(True, False), (True, True), (False, True)])
def test_restore_puts_back_deterministic_algorithms_a_job_changed(changed):
    enabled, warn_only = changed
    _run(
        "fresh = _FreshState()\n"
        "before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())\n"
        f"torch.use_deterministic_algorithms({enabled}, warn_only={warn_only})\n"
        "fresh.restore()\n"
        "after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())\n"
        "assert after == before == (False, False), (before, after)\n"
    )
