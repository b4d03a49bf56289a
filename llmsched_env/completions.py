"""What a run's requests leave behind for its metrics, in memory that does not grow with the run.

A run hands its requests over as they retire (finished, and older than every unfinished one; see
:meth:`~llmsched_env.engine.Engine.retire_finished`) and the rest at the end. Up to
:data:`EXACT_REQUESTS` requests per run the log keeps every record, and every figure is computed from them
exactly. Beyond that (or never, with ``keep_records=True``) it folds them into fixed-size summaries:

* counts, output tokens and sums exactly (so throughput, regret and means are exact);
* latency, censored latency, TTFT and time between tokens in log-spaced histograms (a DDSketch: Masson, Rim and
  Lee, VLDB 2019) whose buckets are ``RELATIVE_ACCURACY`` wide in relative terms, so a quantile is within a relative
  :data:`RELATIVE_ACCURACY` of the exact order statistic it stands for (and interpolated between two of them,
  as NumPy's ``percentile`` interpolates);
* completions and their tokens over time in :data:`CURVE_BINS` bins of the horizon, so the regret curve is exact
  at grid points that fall on bin edges (every divisor of 4,000 points) and within one bin otherwise.

Their size is fixed: about 0.5 MiB, whatever the number of requests.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np

from llmsched_env.engine import FINISHED, RequestRecords
from llmsched_env.errors import ConfigError

#: Requests per run whose records are kept, and whose quantiles are exact.
EXACT_REQUESTS = 100_000
#: Relative accuracy of a quantile beyond :data:`EXACT_REQUESTS` requests.
RELATIVE_ACCURACY = 1e-3
#: Bins of the completion curve over the horizon beyond :data:`EXACT_REQUESTS` requests.
CURVE_BINS = 4000

_GAMMA = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
# Values from 1 ns to 10^9 s get their own bucket; anything outside is clamped to the end buckets.
_LOWEST = math.floor(math.log(1e-9) / _LOG_GAMMA)
_HIGHEST = math.ceil(math.log(1e9) / _LOG_GAMMA)


class Distribution(NamedTuple):
    """Mean and quantiles of a sample (``None`` for an empty one)."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


class QuantileSketch:
    """Log-bucketed counts of positive values (DDSketch): quantiles within a relative :data:`RELATIVE_ACCURACY`."""

    def __init__(self) -> None:
        self.counts = np.zeros(_HIGHEST - _LOWEST + 1, dtype=np.int64)
        self.total = 0
        self.sum = 0.0

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        index = np.ceil(np.log(np.maximum(values, 1e-300)) / _LOG_GAMMA)
        bins = np.clip(index, _LOWEST, _HIGHEST).astype(np.int64) - _LOWEST
        self.counts += np.bincount(bins, minlength=len(self.counts))
        self.total += len(values)
        self.sum += float(np.add.reduce(values))

    def _order_statistic(self, cumulative: np.ndarray, rank: int) -> float:
        """The ``rank``-th smallest value (0-based), as its bucket's representative."""
        bucket = int(np.searchsorted(cumulative, rank, side="right")) + _LOWEST
        return 2.0 * _GAMMA**bucket / (_GAMMA + 1.0)

    def distribution(self) -> Distribution:
        if self.total == 0:
            return Distribution(None, None, None, None)
        cumulative = np.cumsum(self.counts)

        def quantile(q: float) -> float:
            # NumPy's default ("linear"): between the order statistics around q (n - 1).
            rank = q * (self.total - 1)
            low, high = math.floor(rank), math.ceil(rank)
            below, above = self._order_statistic(cumulative, low), self._order_statistic(cumulative, high)
            return below + (above - below) * (rank - low)

        return Distribution(self.sum / self.total, quantile(0.5), quantile(0.9), quantile(0.99))


def exact_distribution(values: np.ndarray) -> Distribution:
    if len(values) == 0:
        return Distribution(None, None, None, None)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return Distribution(float(values.mean()), float(p50), float(p90), float(p99))


class RecordSummary:
    """Fixed-size summaries of request records (see the module's docstring): what a :class:`CompletionLog` keeps
    once it holds more than its exact limit."""

    def __init__(self, horizon: float) -> None:
        self.horizon = horizon
        self.completed = 0
        self.tokens = 0
        self.latency = QuantileSketch()
        self.censored_latency = QuantileSketch()
        self.ttft = QuantileSketch()
        self.tbt = QuantileSketch()
        self.curve_counts = np.zeros(CURVE_BINS, dtype=np.int64)
        self.curve_tokens = np.zeros(CURVE_BINS, dtype=np.int64)

    def add(self, r: RequestRecords, censored: np.ndarray) -> None:
        done = r.status == FINISHED
        finish, output = r.finish_time[done], r.output_len[done]
        self.completed += int(np.count_nonzero(done))
        self.tokens += int(np.add.reduce(output))
        self.latency.add(censored[done])  # a finished request's censored latency is its latency
        self.censored_latency.add(censored)
        started = ~np.isnan(r.first_token_time)
        self.ttft.add(r.first_token_time[started] - r.arrival_time[started])
        self.tbt.add((finish - r.first_token_time[done]) / output)
        # Bin b holds finishes in (b w, (b + 1) w]; those past the horizon go to no bin (no grid point reaches them).
        width = self.horizon / CURVE_BINS
        bins = np.ceil(finish / width).astype(np.int64) - 1
        inside = (bins >= 0) & (bins < CURVE_BINS)
        self.curve_counts += np.bincount(bins[inside], minlength=CURVE_BINS)
        self.curve_tokens += np.bincount(bins[inside], weights=output[inside], minlength=CURVE_BINS).astype(np.int64)

    def completions_by(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        edges = np.floor(np.asarray(grid) / (self.horizon / CURVE_BINS) + 1e-9).astype(np.int64)
        edges = np.clip(edges, 0, CURVE_BINS)
        counts = np.concatenate([[0], np.cumsum(self.curve_counts)])
        tokens = np.concatenate([[0], np.cumsum(self.curve_tokens)])
        return counts[edges], tokens[edges]


class CompletionLog:
    """A run's request records: every one up to ``exact_limit`` requests (or all with ``keep_records``), a
    :class:`RecordSummary` beyond (see the module's docstring).

    Args:
        horizon: the run's horizon (s), which the completion curve's bins divide.
        keep_records: keep every record, however many (memory then grows with the run).
        exact_limit: records kept before the log switches to summaries (default :data:`EXACT_REQUESTS`).
    """

    def __init__(self, horizon: float, *, keep_records: bool = False, exact_limit: int | None = None) -> None:
        self.horizon = horizon
        self.keep_records = keep_records
        self.exact_limit = EXACT_REQUESTS if exact_limit is None else exact_limit
        self.requests = 0
        self._chunks: list[RequestRecords] = []  # every record, while the log is exact
        self._censored: list[np.ndarray] = []  # and each one's censored latency
        self._summary: RecordSummary | None = None  # once it is not (made then: runs that stay exact never pay)

    @property
    def exact(self) -> bool:
        """Whether every record is kept (and every figure is exact)."""
        return self._summary is None

    def add(self, records: RequestRecords, *, now: float | None = None) -> None:
        """Take the records of requests handed over (each request once, in id order) at time ``now`` of the run:
        a request not finished then is censored at its age, ``now`` − arrival (``now`` is needed only if some
        request is not finished; a run hands those over once, at its end)."""
        censored = records.finish_time - records.arrival_time
        unfinished = records.status != FINISHED
        if unfinished.any():
            if now is None:
                raise ValueError("records of unfinished requests need the time they were taken (now=)")
            censored = np.where(unfinished, now - records.arrival_time, censored)
        self.requests += len(records.status)
        if self._summary is not None:
            self._summary.add(records, censored)
            return
        self._chunks.append(records)
        self._censored.append(censored)
        if self.requests > self.exact_limit and not self.keep_records:
            self._summary = RecordSummary(self.horizon)
            for chunk, ages in zip(self._chunks, self._censored):
                self._summary.add(chunk, ages)
            self._chunks, self._censored = [], []

    def copy(self) -> "CompletionLog":
        """An independent copy (what a result takes, while its run may go on)."""
        return copy.deepcopy(self)

    def records(self) -> RequestRecords:
        """Every request's record, in id order; refused once the log keeps summaries only."""
        if self._summary is not None:
            raise ConfigError(f"the run's per-request records were not kept: it had {self.requests:,} requests, more "
                              f"than the {self.exact_limit:,} kept by default; run it with keep_records=True")
        fields = RequestRecords.__dataclass_fields__
        if not self._chunks:
            return RequestRecords(**{name: np.empty(0) for name in fields})
        if len(self._chunks) > 1:  # joined once, for every later reader
            self._chunks = [RequestRecords(**{name: np.concatenate([getattr(c, name) for c in self._chunks])
                                              for name in fields})]
        return self._chunks[0]

    def completed(self) -> tuple[int, int]:
        """Finished requests and their output tokens."""
        if self._summary is not None:
            return self._summary.completed, self._summary.tokens
        r = self.records()
        done = r.status == FINISHED
        return int(done.sum()), int(r.output_len[done].sum())

    def distributions(self) -> dict[str, Distribution]:
        """Latency, censored latency, TTFT and time between tokens (see :mod:`llmsched_env.metrics` for their
        definitions)."""
        if self._summary is not None:
            summary = self._summary
            return {"latency": summary.latency.distribution(),
                    "censored_latency": summary.censored_latency.distribution(), "ttft": summary.ttft.distribution(),
                    "tbt": summary.tbt.distribution()}
        r = self.records()
        done = r.status == FINISHED
        started = ~np.isnan(r.first_token_time)
        if len(self._censored) > 1:  # joined once, as the records are, in the same order
            self._censored = [np.concatenate(self._censored)]
        censored = self._censored[0] if self._censored else np.empty(0)
        return {"latency": exact_distribution(censored[done]),  # a finished request's censored latency is its latency
                "censored_latency": exact_distribution(censored),
                "ttft": exact_distribution(r.first_token_time[started] - r.arrival_time[started]),
                "tbt": exact_distribution((r.finish_time[done] - r.first_token_time[done]) / r.output_len[done])}

    def completions_by(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Requests finished, and their output tokens, by each time of ``grid`` (in ``(0, horizon]``)."""
        if self._summary is not None:
            return self._summary.completions_by(grid)
        r = self.records()
        done = r.status == FINISHED
        order = np.argsort(r.finish_time[done])
        finish = r.finish_time[done][order]
        cumulative_tokens = np.concatenate([[0], np.cumsum(r.output_len[done][order])])
        count = np.searchsorted(finish, grid, side="right")
        return count, cumulative_tokens[count]
