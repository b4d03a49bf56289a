"""Online arrival-rate estimates: what a scheduler can know of the load without being told it."""

from __future__ import annotations

import math

import numpy as np

from llmsched_env import kernels
from llmsched_env.errors import ConfigError


class ArrivalRateEstimator:
    """Exponentially weighted arrival rates per class, with time constant ``window_s``:
    ``Σ_i exp(−(t − a_i) / W) / W`` over the class's arrivals ``a_i <= t``, divided by ``1 − exp(−t / W)``
    (at ``t ≪ W`` fewer arrivals could have been seen: the division removes that start-up bias).

    Used by the agent's observation (:class:`~llmsched_env.admission.AdmissionControl`, per class) and by
    the adaptive policies (:mod:`baselines.adaptive`, in total).
    """

    def __init__(self, window_s: float, classes: int = 1) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigError(f"the rate window must be finite and > 0 s, got {window_s!r}")
        self.window_s = float(window_s)
        self.classes = int(classes)
        #: Per class, ``Σ exp(−(t − a_i) / W) / W`` at :attr:`time` (updated in place: a compiled loop may
        #: advance it, then sets :attr:`time`).
        self.sums = np.zeros(self.classes)
        self.time = 0.0

    def update(self, now: float, arrival_times: np.ndarray, classes: np.ndarray | None = None) -> None:
        """Advance the clock to ``now`` and count the arrivals since the last update (``classes``: each one's
        class; all in class 0 when omitted)."""
        arrival_times = np.asarray(arrival_times, np.float64)
        classes = np.empty(0, np.int64) if classes is None else np.asarray(classes, np.int64)  # empty: all class 0
        # One compiled rule, shared with the environment's compiled step (llmsched_env.episode) and the adaptive
        # policies' compiled loops (baselines.adaptive): every path gets the same estimate on any CPU.
        kernels.count_arrivals(self.sums, self.time, now, arrival_times, classes, self.window_s)
        self.time = float(now)

    @property
    def rates(self) -> np.ndarray:
        """The estimate per class (req/s)."""
        return self.sums / kernels.window_coverage(self.time, self.window_s)

    @property
    def total(self) -> float:
        """The estimate of the total rate (req/s)."""
        return float(self.rates.sum())
