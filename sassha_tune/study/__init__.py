"""Studies: storages, create / continue, the ask-tell loop, budget, heartbeats, retries.

How a study runs (``run``, ``resume`` and ``worker`` all end in :func:`.loop.run_trials`):

1. **Reconcile** (:mod:`.liveness`). A RUNNING trial whose heartbeat (the storage's own) is
   older than ``study.stale_after`` by the database's clock is *lost*: it becomes FAIL with
   ``failure_reason: lost`` and its params are enqueued once.
2. **Budget** (:mod:`.budget`). ``budget.n_trials`` counts every trial of the study, across runs
   and workers, except the ones lost, interrupted or over budget.
3. **Ask** with a sampler seeded from (seed, number of trials so far, worker)
   (:func:`.samplers.trial_seed`), so a resumed seeded study does not repeat its earlier parameter
   sets (Optuna's samplers restart from their seed in a new process).
4. **Train** the trial in a child process (:mod:`sassha_tune.trial`), one path for a single trial
   and a pack (:func:`.loop.run_pack`; a single trial is a pack of one): a single trial in the warm
   trial worker, replaced after a job that may have poisoned it (an out-of-memory error, an
   unexpected one); a pack, a multi-rank trial or ``study.fresh_process`` in a fresh process of its
   own (:class:`.loop.Launcher`). Per-epoch validation metrics come back to this process, which
   reports them and answers prune / go.
5. **Tell** with the user attributes of the outcome (:mod:`.tell`).

Ctrl-C (or SIGTERM, or SIGHUP when the terminal closes, unless ``nohup`` ignores it) marks the
running trial FAIL with ``failure_reason: interrupted`` and changes nothing else. SQLite gets a 60 s lock timeout and every storage call retries with backoff on
``database is locked`` (:mod:`.storage`).

Modules: :mod:`.storage` (URLs, masking, retries, opening), :mod:`.optuna_internals` (the one
module that reads Optuna's private internals), :mod:`.samplers` (what a study runs of
``study.sampler`` and ``study.pruner``: auto's pruner judging only early rungs, the sampler seed of
each ask; the samplers and pruners by name are the config's, :mod:`sassha_tune.config.search`),
:mod:`.create` (create or continue, the stored config), :mod:`.budget`, :mod:`.liveness`
(heartbeats, reconcile), :mod:`.loop` (the ask-tell loop), :mod:`.pack_size` (``--pack``),
:mod:`.chance_guard`, :mod:`.tell`, :mod:`.records` (a stored trial as one typed record),
:mod:`.callbacks` (``study.callbacks``), :mod:`.models` (kept models), :mod:`.progress` (events
for whoever watches), :mod:`.reruns` (seed re-runs), :mod:`.workers` (one worker per GPU),
:mod:`.views` (read-only views for ``status`` and ``export``).

This package's ``__init__`` imports nothing: a module of it that is imported alone (the storage for
``status``, say) does not pull in the run loop.
"""
