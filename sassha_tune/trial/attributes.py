"""The names of the user attributes a trial stores, for the code that writes them and the code that reads them.

A finished trial leaves its result in the storage as Optuna user attributes: the metrics of
:data:`~sassha_tune.metrics.names.STORED_ATTRS`, its per-epoch ``history``, why it failed or was
pruned, whether it is a seed re-run ... The trial (:mod:`.objective`, :mod:`.user_train`) and the
study (its loop, tell, chance guard and re-runs) write them under the names below, and the readers
see a stored trial through :class:`sassha_tune.study.records.TrialRecord`, which reads the same
names. They live here, in the lowest layer that writes one, so that writer and reader name each
attribute with the same constant.
"""

from __future__ import annotations

__all__ = ["FAILURE_REASON", "DIVERGED", "PRUNE_REASON", "NEAR_CHANCE", "HISTORY", "EPOCHS_TRAINED",
           "EPOCHS_COMPLETED", "NUM_CLASSES", "DEVICE", "VAL_ACC", "SEED_ATTR", "SEED_RERUN_ATTR", "RERUN_OF_STUDY"]

#: why a trial failed (``diverged``, ``out_of_memory``, ``error: ...``); kept by a diverged trial told PRUNED
FAILURE_REASON = "failure_reason"
#: the failure reason of a trial whose loss or validation loss stopped being finite
DIVERGED = "diverged"
#: why a trial was pruned when it was not the pruner
PRUNE_REASON = "prune_reason"
#: the prune reason of a trial the study's chance guard stopped
NEAR_CHANCE = "near_chance"
#: the trial's per-epoch history, one dict of :data:`~sassha_tune.metrics.names.EPOCH_KEYS` per epoch
HISTORY = "history"
#: the epochs a trial trained, to the step (a pruned or failed one: what it trained)
EPOCHS_TRAINED = "epochs_trained"
#: the whole epochs a trial completed (what trials stored before ``epochs_trained``)
EPOCHS_COMPLETED = "epochs_completed"
#: the classes of the task, so that "near chance" can be decided (older studies store none)
NUM_CLASSES = "num_classes"
#: the device the trial trained on
DEVICE = "device"
#: the validation accuracy of the last epoch: what a trial is selected on
VAL_ACC = "val_acc"
#: the training seed a trial ran with (an enqueued trial runs with it)
SEED_ATTR = "seed"
#: the number of the trial whose config a seed re-run repeats
SEED_RERUN_ATTR = "seed_rerun_of"
#: the study whose trials a seed re-run repeats (also a user attribute of the companion study)
RERUN_OF_STUDY = "rerun_of_study"
