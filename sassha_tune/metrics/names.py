"""The names of what trials measure and store: one place for each list.

The trainer reports :data:`EPOCH_KEYS` after every epoch; a finished trial stores the user
attributes :data:`STORED_ATTRS` (docs/architecture.md, "Stored trial attributes"); a study may
optimize the :data:`OBJECTIVE_METRICS`. The storage, the report and the CLI read these lists rather
than spelling their own.
"""

from __future__ import annotations

#: one entry of a trial's per-epoch history (``TrainResult.history``, the ``history`` attribute)
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
#: what a language model's epoch entries have besides (validation perplexity)
LANGUAGE_EPOCH_KEYS = ("val_ppl",)
#: what the epochs measured for sharpness during training have besides (``metrics.track_every``;
#: a cheap budget: do not compare with the final ``lambda_max`` / ``hessian_trace``)
TRACKED_EPOCH_KEYS = ("track_lambda_max", "track_hessian_trace", "track_seconds", "track_error")

#: the per-epoch values a pruner can act on (a study objective must be one of them to prune)
PER_EPOCH_METRICS = ("val_acc", "val_loss", "val_ppl")

#: what only language-model trials measure (perplexity: exp of the mean token cross-entropy)
LANGUAGE_METRICS = ("val_ppl", "train_ppl", "test_ppl")

#: the sharpness measures (an objective among them needs ``metrics.sharpness: true``)
SHARPNESS_METRICS = ("lambda_max", "hessian_trace", "sam_sharpness", "adaptive_sharpness")

#: what the sharpness measurement stores per trial (``None`` when it is switched off)
SHARPNESS_ATTRS = ("lambda_max", "hessian_trace", "hessian_trace_se", "sam_sharpness", "adaptive_sharpness",
                   "hvp_count")

#: metrics a study may optimize. test_* is deliberately absent: select on validation, report test once.
OBJECTIVE_METRICS = (
    "val_acc",
    "val_loss",
    "val_ppl",
    "train_acc",
    "train_loss",
    "gen_gap_acc",
    "gen_gap_loss",
    *SHARPNESS_METRICS,
    "train_seconds",
    "ms_per_step",
)

#: the user attributes every finished trial stores
STORED_ATTRS = (
    "val_acc", "val_loss", "train_acc", "train_loss", "test_acc", "test_loss", "gen_gap_acc", "gen_gap_loss",
    "lambda_max", "hessian_trace", "hessian_trace_se", "sam_sharpness", "adaptive_sharpness",
    "epochs_completed", "epochs_trained", "train_seconds", "ms_per_step", "hvp_count", "device", "num_classes",
)

#: the metrics ``status`` shows for a study's best trial, and ``export`` records in its provenance
SUMMARY_METRICS = ("val_acc", "val_loss", "test_acc", "gen_gap_acc", "lambda_max", "hessian_trace", "sam_sharpness",
                   "adaptive_sharpness", "train_seconds", "device")
EXPORTED_METRICS = ("val_acc", "val_loss", "test_acc", "lambda_max")
