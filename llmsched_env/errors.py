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
