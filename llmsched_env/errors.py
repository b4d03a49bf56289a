"""Exceptions raised by llmsched.

Every error says what is wrong and where (file, line, field, the allowed range), so bad input is
never silently dropped or clipped.
"""

from __future__ import annotations


class LLMSchedError(Exception):
    """Base class of every error llmsched raises on purpose."""


class ConfigError(LLMSchedError, ValueError):
    """An impossible or malformed configuration (capacity, cost model, type mix, policy knobs)."""


class TraceFormatError(LLMSchedError, ValueError):
    """A malformed request trace; the message names the file, line and field."""


class RequestTooLargeError(LLMSchedError, ValueError):
    """A request whose full KV footprint (prompt + output tokens) can never fit in memory."""


class InvalidDecisionError(LLMSchedError, ValueError):
    """A policy's decision that the engine cannot carry out (unknown id, wrong state, bad chunk)."""


class EngineFailure(LLMSchedError, RuntimeError):
    """A live engine that died or misbehaved mid-run.

    ``result`` is what the run had done up to the failure (set by :func:`llmsched_env.run`), so that
    no request goes unaccounted for: each is finished, waiting or running in it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.result: object | None = None


class StalledRunError(LLMSchedError, RuntimeError):
    """A run whose policy made no progress while requests waited, for the span
    :class:`llmsched_env.runner.Rollout` watches (``RunResult.stalled_at`` says when it began)."""


#: Errors of a run that started (exit status 1 on the command line); every other LLMSchedError is bad input (2).
RUN_TIME_ERRORS: tuple[type[LLMSchedError], ...] = (EngineFailure, StalledRunError)


class UnsupportedVersionError(LLMSchedError, RuntimeError):
    """An installed engine whose internals this backend was not written against."""
