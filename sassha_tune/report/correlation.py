"""Does flatness predict generalization in this study? Rank correlations of the sharpness measures
with the generalization gap and the held-out accuracies, over the trials that trained, with
bootstrap confidence intervals, a control for "flat because barely trained", and a verdict.

Everything is computed here with numpy (ranks with ties averaged, then Pearson; Kendall's tau-b
from the tied and the discordant pairs, these counted in O(n log n) by merging), so that the tests
can check the values against :mod:`scipy.stats` as an independent implementation.

* **Which trials**: :func:`~sassha_tune.report.health.trained_rows` (complete search trials that
  are not near chance). Untrained networks are trivially flat, so including them manufactures a
  "flatter generalizes better" trend; the same correlations over all complete trials are computed
  too, only to say when the excluded trials would have changed the answer.
* **Intervals**: percentile bootstrap over trials (:data:`N_BOOT` resamples, numpy seed
  :data:`BOOT_SEED`, level :data:`LEVEL`); resamples in which x or y is constant are dropped. A
  resample is held as how often it drew each trial, and every statistic is computed from those
  counts over the trials sorted once (a resample's ranks are cumulative counts), so a resample
  costs O(n) (Kendall: O(n log n)) and the resamples go through in chunks of bounded memory.
* **Control**: the partial Spearman correlation given the training loss (``train_loss``): what is
  left of the relationship once how far each trial trained is accounted for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sassha_tune.metrics.names import SHARPNESS_METRICS
from sassha_tune.study.records import TrialRecord

__all__ = [
    "BOOT_SEED",
    "CONTROL",
    "LEVEL",
    "METHODS",
    "MIN_TRIALS",
    "N_BOOT",
    "PRIMARY",
    "TARGETS",
    "correlate",
    "correlation_entries",
    "find",
    "kendall_tau",
    "partial_spearman",
    "rank",
    "spearman",
    "verdict",
]

#: Bootstrap resamples, their numpy seed and the interval's level.
N_BOOT = 2000
BOOT_SEED = 0
LEVEL = 0.95
#: Fewer trained trials than this: no correlation is estimated at all.
MIN_TRIALS = 5
#: What each sharpness measure is correlated with (the gap first: it is the hypothesis).
TARGETS = ("gen_gap_acc", "val_acc", "test_acc")
#: The control variable of the partial correlation.
CONTROL = "train_loss"
#: The pair the verdict is about.
PRIMARY = ("lambda_max", "gen_gap_acc")
#: The correlation methods, in the order of the entries.
METHODS = ("spearman", "kendall", "partial_spearman")
# Resamples x trials held at once by the bootstrap (int32 counts: a few MB per array).
_CHUNK_CELLS = 1 << 20
# Kendall's discordant pairs within aligned blocks of this many trials are one matrix product.
_BLOCK = 32


class _Ties:
    """One variable's trials sorted once, with its runs of equal values (tie groups)."""

    def __init__(self, values: np.ndarray) -> None:
        self.order = np.argsort(values, kind="mergesort")
        ordered = values[self.order]
        new = np.ones(len(values), dtype=bool)
        new[1:] = ordered[1:] != ordered[:-1]
        self.starts = np.flatnonzero(new)  # first sorted position of each group
        self.group = np.empty(len(values), dtype=np.intp)
        self.group[self.order] = np.cumsum(new) - 1  # each trial's group (groups in value order)
        self.untied = len(self.starts) == len(values)  # every group one trial

    def totals(self, counts: np.ndarray) -> np.ndarray:
        """How many draws fell in each tie group (rows), per resample (columns of ``counts``)."""
        ordered = counts[self.order]
        return ordered if self.untied else np.add.reduceat(ordered, self.starts, axis=0)

    def midranks(self, counts: np.ndarray) -> np.ndarray:
        """Each trial's average rank within each resample (ties averaged, as :func:`rank`), in
        float32: whole and half numbers up to 2**23 (the draws of a resample) are exact there."""
        totals = self.totals(counts).astype(np.float32)
        below = np.cumsum(totals, axis=0, dtype=np.float32) - totals
        return (below + (totals + 1) / 2)[self.group]


def _tied_pairs(totals: np.ndarray) -> np.ndarray:
    """Pairs of draws within the same tie group, per resample."""
    return (totals.astype(np.int64) * (totals - 1) // 2).sum(axis=0)


class _Discordance:
    """Counts the discordant pairs of (x, y) (``x_i < x_j`` and ``y_i > y_j``) of a resample from
    its counts, as a bottom-up merge sort would: the trials sorted by x (ties by y), the pairs
    within aligned blocks of :data:`_BLOCK` trials through one 0/1 matrix per block, then at each
    level every trial of a right half against the left half beside it, whose trials are sorted by y
    once here; a resample needs a cumulative sum and a few gathers per level (O(n log n))."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        n = self.n = len(x)
        self.order = np.lexsort((y, x))  # by x, ties by y: a pair tied in x is never discordant
        y_rank = np.unique(y, return_inverse=True)[1].ravel()[self.order]  # dense ranks: ties equal
        blocks = np.full(-(-n // _BLOCK) * _BLOCK, -1)
        blocks[:n] = y_rank
        blocks = blocks.reshape(-1, _BLOCK)
        later = np.triu(np.ones((_BLOCK, _BLOCK), dtype=bool), 1)
        self.within = (later & (blocks[:, :, None] > blocks[:, None, :])).astype(float)  # [block, i, j]
        self.dtype = np.int32 if n * n < 2**31 else np.int64  # a count times a count fits
        pos = np.arange(n)
        self.levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        half = _BLOCK
        while half < n:
            block, left = pos // (2 * half), pos % (2 * half) < half
            left_pos = pos[left]
            left_pos = left_pos[np.lexsort((y_rank[left_pos], block[left_pos]))]  # by block, then y
            key = block[left_pos] * n + y_rank[left_pos]  # ascending
            right_pos = pos[~left]
            at_most = np.searchsorted(key, block[right_pos] * n + y_rank[right_pos], side="right")
            block_end = np.searchsorted(key, block[right_pos] * n + n, side="left")
            self.levels.append((left_pos, right_pos, at_most, block_end))
            half *= 2

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        c = counts[self.order].astype(self.dtype)
        resamples = c.shape[1]
        padded = np.zeros((self.within.shape[0] * _BLOCK, resamples))
        padded[:self.n] = c
        by_block = padded.reshape(-1, _BLOCK, resamples)  # [block, i, resample]
        pairs = np.einsum("kib,kib->b", self.within @ by_block, by_block)  # within[k] is [i, j], i before j
        total = np.rint(pairs).astype(np.int64)
        for left_pos, right_pos, at_most, block_end in self.levels:
            cum = np.zeros((len(left_pos) + 1, resamples), dtype=self.dtype)
            np.cumsum(c[left_pos], axis=0, dtype=self.dtype, out=cum[1:])
            greater = cum[block_end] - cum[at_most]  # draws of the left half with a larger y
            total += (c[right_pos] * greater).sum(axis=0, dtype=np.int64)
        return total


class _Sample:
    """The trials that have a value of every variable (``columns`` by name) and the statistics
    over resamples of them, each resample given as how often it drew each trial (a column of
    ``counts``, trials x resamples; one column of ones: the sample itself). Within one batch of
    resamples, each variable's ranks and each pair's Pearson correlation are computed once for
    every statistic that needs them (:class:`_Batch`)."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns
        self.n = len(next(iter(columns.values())))
        self._ties: dict[str, _Ties] = {}
        self._pairs: dict[tuple[str, str], tuple[_Ties | None, _Discordance]] = {}

    def ties(self, key: str) -> _Ties:
        if key not in self._ties:
            self._ties[key] = _Ties(self.columns[key])
        return self._ties[key]

    def statistics(self, wanted: Sequence[tuple[str, str, str]], counts: np.ndarray) -> list[np.ndarray]:
        """``(method, x, y)`` (partial Spearman: given :data:`CONTROL`) -> its value per column of ``counts``."""
        return _Batch(self, counts).statistics(wanted)

    def kendall_parts(self, x: str, y: str) -> tuple[_Ties | None, _Discordance]:
        """The groups of trials tied in both x and y (None: none, when x or y has no ties) and the
        discordant-pair counter of (x, y), made once."""
        if (x, y) not in self._pairs:
            tx, ty = self.ties(x), self.ties(y)
            both = None if tx.untied or ty.untied else _Ties((tx.group * (ty.group.max() + 1) + ty.group).astype(float))
            self._pairs[(x, y)] = (both, _Discordance(self.columns[x], self.columns[y]))
        return self._pairs[(x, y)]


class _Batch:
    """One batch of resamples (``counts``) of a :class:`_Sample`: each variable's ranks, tie
    counts and each pair's correlation computed once, for every statistic asked of the batch."""

    def __init__(self, sample: _Sample, counts: np.ndarray) -> None:
        self.sample, self.counts = sample, counts
        self.draws = counts.sum(axis=0).astype(float)
        self._centred: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._rho: dict[tuple[str, str], np.ndarray] = {}
        self._tied: dict[str | None, np.ndarray] = {}

    def statistics(self, wanted: Sequence[tuple[str, str, str]]) -> list[np.ndarray]:
        out = []
        for method, x, y in wanted:
            if method == "spearman":
                out.append(self.pearson(x, y))
            elif method == "partial_spearman":
                out.append(_partial(self.pearson(x, y), self.pearson(x, CONTROL), self.pearson(y, CONTROL)))
            else:
                out.append(self.kendall(x, y))
        return out

    def centred(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A variable's ranks about their mean ((draws + 1) / 2 exactly), weighted by the counts, and
        their weighted sum of squares."""
        if key not in self._centred:
            r = self.sample.ties(key).midranks(self.counts) - ((self.draws + 1) / 2).astype(np.float32)  # exact
            weighted = self.counts * r.astype(float)
            self._centred[key] = (r, weighted, np.einsum("ij,ij->j", weighted, r))
        return self._centred[key]

    def pearson(self, a: str, b: str) -> np.ndarray:
        """Spearman's rho of a and b: Pearson of their ranks; NaN where one is constant."""
        if (a, b) not in self._rho:
            (_, wa, ssa), (rb, _, ssb) = self.centred(a), self.centred(b)
            den = np.sqrt(ssa * ssb)
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.einsum("ij,ij->j", wa, rb) / den
            self._rho[(a, b)] = np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)
        return self._rho[(a, b)]

    def tied(self, ties: _Ties | None) -> np.ndarray:
        """Pairs of draws tied in a variable (``ties``; None: only copies of the same trial)."""
        key = None if ties is None or ties.untied else id(ties)
        if key not in self._tied:
            self._tied[key] = _tied_pairs(self.counts if key is None else ties.totals(self.counts))
        return self._tied[key]

    def kendall(self, x: str, y: str) -> np.ndarray:
        """Kendall's tau-b: (concordant - discordant) / sqrt((pairs - tied in x)(pairs - tied in y)),
        with concordant - discordant = pairs - tied in x - tied in y + tied in both - 2 discordant."""
        both, discordant = self.sample.kendall_parts(x, y)
        m = self.counts.sum(axis=0, dtype=np.int64)
        pairs = m * (m - 1) // 2
        tied_x, tied_y = self.tied(self.sample.ties(x)), self.tied(self.sample.ties(y))
        s = pairs - tied_x - tied_y + self.tied(both) - 2 * discordant(self.counts)
        den = np.sqrt((pairs - tied_x).astype(float) * (pairs - tied_y))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, s / den, np.nan)


def _partial(rxy: np.ndarray, rxz: np.ndarray, ryz: np.ndarray) -> np.ndarray:
    """The partial correlation of x and y given z from their three correlations."""
    den = np.sqrt((1 - rxz**2) * (1 - ryz**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rxy - rxz * ryz) / den
    return np.where(den > 1e-12, np.clip(r, -1.0, 1.0), np.nan)


def rank(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their average rank (vectorized over rows)."""
    a = np.asarray(values, dtype=float)
    flat = a.reshape(-1, a.shape[-1])
    out = np.stack([_Ties(row).midranks(np.ones((len(row), 1), dtype=np.int32))[:, 0] for row in flat])
    return out.reshape(a.shape)


def _rowwise(method: str, *columns: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """``method`` of x and y (and z, the control) along their last axis, row by row."""
    arrays = np.broadcast_arrays(*(np.asarray(c, dtype=float) for c in columns))
    n = arrays[0].shape[-1]
    flat = [a.reshape(-1, n) for a in arrays]
    names = ("x", "y", CONTROL)
    ones = np.ones((n, 1), dtype=np.int32)
    out = np.array([_Sample({k: f[i] for k, f in zip(names, flat, strict=False)}).statistics(
        [(method, "x", "y")], ones)[0][0] for i in range(len(flat[0]))])
    out = out.reshape(arrays[0].shape[:-1])
    return float(out) if out.ndim == 0 else out


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Spearman's rho (Pearson of the average ranks) along the last axis; NaN when constant."""
    return _rowwise("spearman", x, y)


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Kendall's tau-b (ties in x or y corrected) along the last axis; NaN when constant."""
    return _rowwise("kendall", x, y)


def partial_spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                     z: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Spearman correlation of x and y given z: the partial correlation of their ranks,
    ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))``; NaN when z explains x or y fully."""
    return _rowwise("partial_spearman", x, y, z)


def _resamples(n: int) -> Iterator[np.ndarray]:
    """The :data:`N_BOOT` bootstrap resamples of n trials as draw counts, one column per resample
    (int32, trials x resamples), a bounded chunk at a time; the draws are those of one
    ``integers(0, n, (N_BOOT, n))`` call."""
    rng = np.random.default_rng(BOOT_SEED)
    chunk = max(1, min(N_BOOT, _CHUNK_CELLS // n))
    for start in range(0, N_BOOT, chunk):
        rows = min(chunk, N_BOOT - start)
        drawn = rng.integers(0, n, size=(rows, n)) * rows + np.arange(rows)[:, None]  # trial * rows + resample
        yield np.bincount(drawn.ravel(), minlength=n * rows).reshape(n, rows).astype(np.int32)


def _interval(values: np.ndarray) -> list[float] | None:
    """The percentile interval of a statistic's bootstrap values (degenerate resamples dropped)."""
    values = values[np.isfinite(values)]
    if len(values) < N_BOOT // 2:  # mostly degenerate resamples: no interval
        return None
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _value(row: TrialRecord, key: str) -> float:
    return row.val_acc if key == "val_acc" else row.metric(key)


def _keys(x: str, y: str, method: str) -> tuple[str, ...]:
    return (x, y, CONTROL) if method == "partial_spearman" else (x, y)


def _entries(rows: Sequence[TrialRecord], specs: Sequence[tuple[str, str, str]], over: str) -> list[dict[str, Any]]:
    """One entry per ``(x, y, method)`` of ``specs``, each over the rows with a finite value of
    its variables. Entries over the same trials share one pass of the resamples."""
    keys = sorted({k for x, y, method in specs for k in _keys(x, y, method)})
    values = {k: np.array([_value(r, k) for r in rows], dtype=float).reshape(-1) for k in keys}
    entries, groups = [], {}
    for x, y, method in specs:
        kept = np.logical_and.reduce([np.isfinite(values[k]) for k in _keys(x, y, method)])
        entry: dict[str, Any] = {"x": x, "y": y, "method": method, "value": None, "ci": None,
                                 "n": int(kept.sum()), "over": over}
        if method == "partial_spearman":
            entry["given"] = CONTROL
        entries.append(entry)
        if entry["n"] >= MIN_TRIALS:
            groups.setdefault(kept.tobytes(), (kept, []))[1].append(entry)
    for kept, group in groups.values():
        _fill(group, _Sample({k: values[k][kept] for e in group for k in _keys(e["x"], e["y"], e["method"])}))
    return entries


def _fill(group: list[dict[str, Any]], sample: _Sample) -> None:
    """Set the value and the bootstrap interval of each entry of ``group``, all over ``sample``."""
    wanted = [(e["method"], e["x"], e["y"]) for e in group]
    for e, value in zip(group, sample.statistics(wanted, np.ones((sample.n, 1), dtype=np.int32)), strict=True):
        e["value"] = float(value[0]) if math.isfinite(value[0]) else None
    group = [e for e in group if e["value"] is not None]
    if group:
        boot = _bootstrap(sample, [(e["method"], e["x"], e["y"]) for e in group])
        for e, draws in zip(group, boot, strict=True):
            e["ci"] = _interval(draws)


def _bootstrap(sample: _Sample, wanted: list[tuple[str, str, str]]) -> list[np.ndarray]:
    """Each wanted statistic over the :data:`N_BOOT` resamples of ``sample``, batch by batch."""
    done = [sample.statistics(wanted, counts) for counts in _resamples(sample.n)]
    return [np.concatenate([batch[i] for batch in done]) for i in range(len(wanted))]


def correlate(x: str, y: str, method: str, rows: Sequence[TrialRecord], over: str = "trained") -> dict[str, Any]:
    """One correlation entry ``{"x", "y", "method", "value", "ci", "n", "over"}`` over ``rows``."""
    return _entries(rows, [(x, y, method)], over)[0]


def correlation_entries(rows: Sequence[TrialRecord], over: str = "trained",
                        methods: Sequence[str] = METHODS) -> list[dict[str, Any]]:
    """For each sharpness measure and each of :data:`TARGETS`: Spearman, Kendall and the partial
    Spearman given :data:`CONTROL` (or ``methods`` of them), each ``{"x", "y", "method", "value",
    "ci": [lo, hi], "n", "over"}`` (``value`` / ``ci`` ``None`` below :data:`MIN_TRIALS` trials or
    when a variable is constant). ``rows``: the trials to correlate over (``over`` names them in the
    entries)."""
    return _entries(rows, [(x, y, method) for x in SHARPNESS_METRICS for y in TARGETS for method in methods], over)


def find(entries: Sequence[dict[str, Any]], x: str, y: str, method: str) -> dict[str, Any] | None:
    """The entry for (x, y, method), or None."""
    return next((e for e in entries if (e["x"], e["y"], e["method"]) == (x, y, method)), None)


def _excludes_zero(entry: dict[str, Any] | None) -> bool:
    return bool(entry and entry["ci"] and (entry["ci"][0] > 0 or entry["ci"][1] < 0))


def _fmt(entry: dict[str, Any]) -> str:
    ci = entry["ci"]
    interval = f", {LEVEL:.0%} CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ", no interval"
    return f"{entry['value']:+.2f}{interval}, n = {entry['n']}"


def verdict(entries: Sequence[dict[str, Any]], complete_entries: Sequence[dict[str, Any]], excluded: int) -> str:
    """One short paragraph: what the numbers support about lambda_max and the generalization gap
    over the trained trials (``entries``: :func:`correlation_entries` over them), and what they
    don't; ``complete_entries`` (their Spearman entries over all complete trials) and
    ``excluded`` (how many near-chance trials were left out) say whether leaving them out mattered."""
    x, y = PRIMARY
    main = find(entries, x, y, "spearman")
    partial = find(entries, x, y, "partial_spearman")
    assert main is not None and partial is not None
    if main["value"] is None:
        why = (f"only {main['n']} trained trials have both {x} and {y}" if main["n"] < MIN_TRIALS
               else f"{x} or {y} is constant over the trained trials")
        return (f"Not enough data to say whether flatness predicts generalization here: {why} "
                f"(at least {MIN_TRIALS} are needed, and a few dozen for a useful interval).")
    text = f"Over the {main['n']} trained trials, Spearman's rho of {x} with {y} is {_fmt(main)}. "
    if _excludes_zero(main):
        direction = ("sharper minima (higher lambda_max) come with a larger gap: flatter generalized better"
                     if main["value"] > 0 else
                     "sharper minima come with a smaller gap, the opposite of the flat-minima hypothesis")
        text += f"The interval excludes 0, so this study supports a monotone relationship: {direction}. "
        if partial is not None and partial["value"] is not None:
            if _excludes_zero(partial):
                text += (f"It survives the control for how far each trial trained (partial rho given "
                         f"{CONTROL}: {_fmt(partial)}). ")
            else:
                text += (f"But given {CONTROL} it is not distinguishable from 0 (partial rho {_fmt(partial)}): "
                         "it may only say that less-trained networks are both flatter and overfit less. ")
        text += "A correlation over tuned trials is not a causal effect of flatness."
    else:
        wide = main["ci"] is None or main["ci"][1] - main["ci"][0] > 1.0
        text += "The interval includes 0: these trials show no reliable monotone relationship"
        text += (", and it is too wide to conclude either way (more trials needed)." if wide else
                 "; a strong effect in either direction is unlikely here.")
    if excluded:
        full = find(complete_entries, x, y, "spearman")
        if full is not None and full["value"] is not None and _excludes_zero(full) != _excludes_zero(main):
            text += (f" With the {excluded} near-chance trials included, rho would be {_fmt(full)}: "
                     "an artefact of untrained networks being trivially flat, not evidence.")
        else:
            text += f" ({excluded} near-chance trials were left out; including them does not change this.)"
    return text.strip()
