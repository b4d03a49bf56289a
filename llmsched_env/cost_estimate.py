"""How fast the engine really runs: an online estimate of the cost model, from the iterations it ran.

The fluid targets of WAIT and Nested WAIT (their thresholds, the memory they keep back) are computed from a cost
profile. When the engine runs slower than its profile (a shared or throttled machine, another GPU, a model
served with other settings) a policy sized on the profile plans for iterations that never come: its batches are
too small for the load and its queue grows, while vLLM's scheduler, which plans nothing, batches more.

:class:`CostFollower` watches each iteration's measured duration against the profile's prediction for the same
composition (:attr:`~llmsched_env.engine.SchedulerState.last_iteration`), averaged with exponential weights over
``window_s`` seconds of engine time (each iteration weighs its own duration, so a window holds about
``window_s`` of busy time whatever the batch size), and reports the factor the profile is off by: the ratio of
the two sums. The cost model it gives is the profile with every coefficient times that factor, when the factor
is off 1 by more than ``tolerance`` (and ``min_iterations`` have been seen); the profile itself otherwise, so an
exact profile leaves every decision as it was, bit for bit.

Why one factor, not the coefficients refitted: under a threshold policy in steady state the batches barely
change in composition, so the window cannot tell a per-token cost from a per-iteration one (a least-squares fit
of five coefficients on nearly collinear rows is noise), while the ratio of the sums is determined by any
window; and what the fluid sizing needs is the iteration time at the operating point, which the scaled profile
matches there. A machine that is uniformly slower is exactly a scaled profile. Fitting every coefficient from
the engine's own iterations is ``llmsched calibrate`` (offline, on varied batches).

The state is one float64 array (:attr:`CostFollower.state`), so that a compiled policy loop follows the engine
in place, through the same function as the Python path (:func:`follow_iteration`).
"""

from __future__ import annotations

import math

import numpy as np

from llmsched_env.compiled import compiled_inlined
from llmsched_env.cost_model import LinearCostModel
from llmsched_env.engine import (
    LAST_DECODE_REQUESTS,
    LAST_END,
    LAST_KV_TOKENS,
    LAST_PREFILL_ATTENTION,
    LAST_PREFILL_TOKENS,
    LAST_SECONDS,
)
from llmsched_env.errors import ConfigError
from llmsched_env.kernels import iteration_seconds

#: Indices of :attr:`CostFollower.state`: the profile's five coefficients (``LinearCostModel.coefficients()``
#: order), then the weighted sums of measured and predicted seconds, the end of the last iteration counted, how
#: many were counted, and the settings.
PROFILE = 0  # PROFILE … PROFILE + 4: c0, c_pf, c_dec, c_kv, c_pf2
MEASURED, PREDICTED, SEEN_UNTIL, COUNTED, WINDOW, TOLERANCE, MIN_ITERATIONS = range(5, 12)
STATE_SIZE = 12
#: The factor is kept within [1 / MAX_FACTOR, MAX_FACTOR]: beyond it the profile is not of this engine at all.
MAX_FACTOR = 100.0


@compiled_inlined
def follow_iteration(state: np.ndarray, last: np.ndarray) -> None:
    """Count the engine's last iteration (:attr:`~llmsched_env.engine.SchedulerState.last_iteration`) into
    ``state`` unless it ran nothing or was counted already (a policy may look at the same state more than once)."""
    seconds = last[LAST_SECONDS]
    if seconds <= 0 or last[LAST_END] <= state[SEEN_UNTIL]:
        return
    predicted = iteration_seconds(state[PROFILE:PROFILE + 5], last[LAST_PREFILL_TOKENS], last[LAST_DECODE_REQUESTS],
                                  last[LAST_KV_TOKENS], last[LAST_PREFILL_ATTENTION])
    keep = math.exp(-seconds / state[WINDOW])
    state[MEASURED] = state[MEASURED] * keep + seconds
    state[PREDICTED] = state[PREDICTED] * keep + predicted
    state[SEEN_UNTIL] = last[LAST_END]
    state[COUNTED] += 1


@compiled_inlined
def followed_factor(state: np.ndarray) -> float:
    """The factor the profile is taken to be off by now: 1 until enough iterations are counted, or while the
    measured time is within the tolerance of the predicted; else their ratio (bounded by ``MAX_FACTOR``)."""
    if state[COUNTED] < state[MIN_ITERATIONS] or state[PREDICTED] <= 0:
        return 1.0
    ratio = state[MEASURED] / state[PREDICTED]
    if abs(ratio - 1.0) <= state[TOLERANCE]:
        return 1.0
    return min(max(ratio, 1.0 / MAX_FACTOR), MAX_FACTOR)


class CostFollower:
    """The cost profile, followed online (see the module docstring).

    Args:
        profile: the cost model the policy was configured with.
        window_s: the time constant of the average, in seconds of engine time (default 30).
        tolerance: how far (relative) the engine may be from the profile before the profile is scaled
            (default 0.1; ``inf`` never follows: the profile as given).
        min_iterations: iterations counted before the profile may be scaled (default 20).
    """

    def __init__(self, profile: LinearCostModel, window_s: float = 30.0, tolerance: float = 0.1,
                 min_iterations: int = 20) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigError(f"the cost window must be finite and > 0 s, got {window_s!r}")
        if not (tolerance >= 0):
            raise ConfigError(f"the cost tolerance must be >= 0 (inf: never follow), got {tolerance!r}")
        if min_iterations < 1:
            raise ConfigError(f"the cost follower needs min_iterations >= 1, got {min_iterations!r}")
        self.profile = profile
        self.state = np.zeros(STATE_SIZE, dtype=np.float64)
        self.state[PROFILE:PROFILE + 5] = profile.coefficients()
        self.state[WINDOW], self.state[TOLERANCE], self.state[MIN_ITERATIONS] = window_s, tolerance, min_iterations
        self.reset()

    def reset(self) -> None:
        """Forget every iteration counted."""
        self.state[MEASURED] = self.state[PREDICTED] = self.state[COUNTED] = 0.0
        self.state[SEEN_UNTIL] = -math.inf

    def observe(self, last_iteration: np.ndarray) -> None:
        """Count the engine's last iteration (:func:`follow_iteration`)."""
        follow_iteration(self.state, np.asarray(last_iteration, dtype=np.float64))

    @property
    def factor(self) -> float:
        """How much slower (> 1) or faster (< 1) than its profile the engine runs (:func:`followed_factor`)."""
        return float(followed_factor(self.state))

    @property
    def measured_ratio(self) -> float:
        """Measured over predicted seconds in the window (``nan`` before any iteration): the factor before the
        tolerance and the bounds."""
        return float(self.state[MEASURED] / self.state[PREDICTED]) if self.state[PREDICTED] > 0 else math.nan

    def cost(self) -> LinearCostModel:
        """The cost model to size on now: the profile, scaled by :attr:`factor` when it is not 1."""
        factor = self.factor
        return self.profile if factor == 1.0 else self.profile.scaled(factor)
