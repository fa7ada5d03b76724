"""One trial in a fresh process: the trial protocol, its parent and child sides, and the trial itself.

A study trains every trial (a single trial, a pack of trials, each rank of a multi-rank trial) in
a child process, so that an out-of-memory error or a leaked CUDA context cannot poison the next
one. Parent and child speak one protocol, in JSON lines:

* **Job** (parent -> child, one line on the child's stdin)::

    {"study": NAME, "config": CONFIG, "params": PARAMS, "device": DEVICE, "prune": BOOL, "steps": SECONDS,
     "save_model": PATH}

  ``config`` is a validated config as plain data (:func:`sassha_tune.config.config_to_dict`); the
  child rebuilds it with :func:`sassha_tune.config.config_from_stored`, without validating it
  again. ``params`` is one trial's parameters (a mapping) or a pack's (a list of mappings).
  ``save_model`` (optional; a pack's: a list, one path or null per member): where a trial that
  completes writes its model file (:mod:`.saved_model`; ``study.keep_models``).
* **Messages** (child -> parent, lines on the child's stdout; whatever the trial prints goes to
  stderr): ``{"type": "started"}`` first, when the child takes the job up (its imports done: the
  trial's ``budget.trial_timeout`` counts from here); ``{"type": "epoch", "epoch": N, "metrics": {...}}`` after every epoch (a classifier's
  metrics carry ``num_classes``), answered by the parent with a ``go`` or ``stop`` line when the
  job prunes (``"prune": true``: a pruner or the chance guard may stop it); ``{"type": "result", "state": ...,
  "attrs": {...}, "values": [...], "failure_reason": ...}`` once (:class:`.outcome.TrialOutcome`);
  ``{"type": "user_error", "message": ...}`` for a :class:`~sassha_tune.errors.UserError`. A pack's
  epoch and result messages carry ``"member": I`` (the index in ``params``), and a pack that ran
  out of memory before any member reported says ``{"type": "split", "epoch": N, "halves": [...]}``.
  ``{"type": "phase", "phase": NAME}`` says a part of the trial that sends no epoch messages
  begins; today one name, ``"sharpness"``, sent just before the sharpness of a trained model is
  measured (after its last epoch; a pack's carries ``member``; a multi-rank trial relays rank 0's),
  and by a single trial before each measurement during training (``metrics.track_every``).
  It is not answered. A job whose ``"steps"`` is a number of seconds (someone watches: a live
  view; :data:`.process.STEP_SECONDS`) also gets ``{"type": "step", "epoch": E, "step": S,
  "steps": N}`` within long epochs, at most that often (a pack's lists the ``"members"`` of
  the pack now training, those that already left included: the parent shows the pending ones), unanswered; ``null`` or absent: none. A parent ignores message types it does not know (and phases it does not
  show), so a child may send new kinds of ``phase`` without breaking an older parent.
* A trial process draws no progress bar of its own, whatever its stderr is: the study shows its
  epochs (the CLI's live view, :mod:`sassha_tune.app.live`).
* **Exit code**: 0 done, 1 an unexpected error (a ``fail`` result with the reason was sent, the
  traceback is on stderr), 2 a user error, 3 no job or the parent is gone, 130 interrupted.
* **Warm worker** (``python -m sassha_tune.trial --serve``, a study's default for single trials):
  job after job on the same stdin, each answered by its messages and then ``{"type": "done",
  "code": C, "replace": R}`` (C: the exit code above). Before every job the worker puts back the torch
  settings it started with (default dtype, deterministic algorithms, grad mode, threads, matmul
  precision, cuDNN / TF32 flags, autocast, anomaly detection) and frees what the last one left; the trainer seeds every
  generator. ``replace: true`` (an unexpected error, out of memory, Ctrl-C) means it exits after
  this job; end of input ends it (exit 0).

Modules: :mod:`.process` (the parent side: :class:`~.process.TrialProcess`, in a fresh process or
a :class:`~.process.WarmWorker`), :mod:`.child` (the child side, ``python -m sassha_tune.trial``),
:mod:`.objective` (a trial as a function: params -> trained model -> metrics -> outcome),
:mod:`.measured` (sharpness and objective values of a trained trial), :mod:`.ranks` (a trial as N
rank processes), :mod:`.user_train` (``task.train``), :mod:`.outcome` (the outcome and its message),
:mod:`.saved_model` (a trained model as a file), :mod:`.preflight` (the checks that need the data).

This package's ``__init__`` imports nothing: the study loop starts trials through :mod:`.process`
(and :mod:`.ranks` starts rank processes through it), which must not pull in the trial code.
"""
