"""Paged KV-cache accounting: the one place that knows how much KV memory each request holds."""

from __future__ import annotations

import numpy as np

from llmsched_env import kernels
from llmsched_env.engine import readonly_view
from llmsched_env.errors import ConfigError
from llmsched_env.request_table import allocate_column, release_ids


class PagedKVCache:
    """KV tokens held per request id, and blocks in use in total, under a hard capacity.

    Memory is paged as in vLLM: a request holding ``t`` KV tokens occupies ``ceil(t / block_size)``
    blocks (so per-request blocks are derived from tokens, never stored twice). The cache never lets
    the total exceed ``capacity_blocks``; callers plan evictions first, and an attempt to overflow is
    a bug, reported as an ``AssertionError``.
    """

    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        if not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ConfigError(f"block_size must be an integer >= 1 token, got {block_size!r}")
        if not isinstance(capacity_blocks, (int, np.integer)) or capacity_blocks < 1:
            raise ConfigError(f"KV capacity must be at least one block, got {capacity_blocks!r} blocks")
        self.capacity_blocks = int(capacity_blocks)
        self.block_size = int(block_size)
        self.used_blocks = 0
        self.used_tokens = 0
        self._tokens = np.zeros(1024, dtype=np.int64)
        self._tokens_view = readonly_view(self._tokens)

    @classmethod
    def from_tokens(cls, capacity_tokens: int, block_size: int) -> "PagedKVCache":
        """A cache of ``capacity_tokens`` tokens, rounded down to whole blocks."""
        if not isinstance(capacity_tokens, (int, np.integer)) or capacity_tokens < 1:
            raise ConfigError(f"KV capacity must be an integer >= 1 token, got {capacity_tokens!r}")
        if isinstance(block_size, (int, np.integer)) and capacity_tokens < block_size:
            raise ConfigError(f"KV capacity of {capacity_tokens} tokens is less than one block of {block_size}")
        return cls(capacity_tokens // block_size if isinstance(block_size, (int, np.integer)) and block_size >= 1
                   else 0, block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def tokens(self) -> np.ndarray:
        """KV tokens held per request id (read-only view; replaced when ids are reserved)."""
        return self._tokens_view

    @property
    def token_column(self) -> np.ndarray:
        """The writable column behind :attr:`tokens`, for a compiled iteration that updates it in place
        (:func:`llmsched_env.kernels.run_iteration`; the totals then go through :meth:`account`)."""
        return self._tokens

    def blocks_for(self, tokens: np.ndarray | int) -> np.ndarray | int:
        """Blocks that ``tokens`` KV tokens occupy."""
        return -(-tokens // self.block_size)

    def reserve_ids(self, count: int, keep_from: int = 0) -> None:
        """Make room for request ids ``0 .. count - 1``; those before ``keep_from`` are retired (not copied)."""
        if count > len(self._tokens):
            grown = allocate_column(max(count, 2 * len(self._tokens)), np.int64)
            grown[keep_from:len(self._tokens)] = self._tokens[keep_from:]
            release_ids(self._tokens, 0, len(self._tokens))  # a view kept of the old column must not keep its memory
            self._tokens = grown
            self._tokens_view = readonly_view(grown)

    def release_ids(self, start: int, end: int) -> None:
        """Retired ids ``start .. end - 1`` (finished: they hold nothing) need no memory any more."""
        release_ids(self._tokens, start, end)

    def held_blocks(self, ids: np.ndarray) -> np.ndarray:
        return self.blocks_for(self._tokens[ids])

    def set_tokens(self, ids: np.ndarray, old_tokens: np.ndarray, new_tokens: np.ndarray, block_delta: int) -> None:
        """Record that ``ids`` (distinct, holding ``old_tokens``) now hold ``new_tokens``, which takes
        ``block_delta`` more blocks (the caller computed it when planning the iteration)."""
        self.used_blocks += block_delta
        self.used_tokens += int(np.add.reduce(new_tokens) - np.add.reduce(old_tokens))
        assert self.used_blocks <= self.capacity_blocks, "KV overflow: evictions must be planned before allocating"
        self._tokens[ids] = new_tokens

    def account(self, block_delta: int, token_delta: int) -> None:
        """Record totals changed in place by a compiled iteration (:func:`llmsched_env.kernels.run_iteration`,
        which writes the per-request tokens): ``block_delta`` blocks and ``token_delta`` tokens more."""
        self.used_blocks += int(block_delta)
        self.used_tokens += int(token_delta)
        assert self.used_blocks <= self.capacity_blocks, "KV overflow: evictions must be planned before allocating"

    def append_token(self, ids: np.ndarray, tokens_before: np.ndarray, new_blocks: int) -> None:
        """Each of ``ids`` (distinct, holding ``tokens_before``) gains one token; ``new_blocks`` of them
        cross a block edge. The decode fast path: the caller counted the edges when planning."""
        self.used_blocks += new_blocks
        self.used_tokens += len(ids)
        assert self.used_blocks <= self.capacity_blocks, "KV overflow: evictions must be planned before allocating"
        self._tokens[ids] = tokens_before + 1

    def free(self, ids: np.ndarray) -> None:
        """Release everything ``ids`` hold."""
        held = self._tokens[ids]
        self.used_blocks -= int(np.add.reduce(self.blocks_for(held)))
        self.used_tokens -= int(np.add.reduce(held))
        self._tokens[ids] = 0


def projected_peak_tokens(context: np.ndarray, remaining: np.ndarray) -> int:
    """The most KV tokens that running requests will hold together before they all finish.

    Request ``i`` holds ``context_i`` tokens and decodes ``remaining_i >= 1`` more; after ``t`` more
    iterations it holds ``context_i + t`` if ``remaining_i >= t`` (finished requests free their KV).
    The total is piecewise linear and increasing between finishes, so its maximum is at some
    ``t = remaining_i`` (compiled: :func:`llmsched_env.kernels.peak_tokens`).
    """
    return int(kernels.peak_tokens(np.asarray(context, np.int64), np.asarray(remaining, np.int64)))


def projected_peak_blocks(context: np.ndarray, remaining: np.ndarray, block_size: int) -> int:
    """:func:`projected_peak_tokens` in KV blocks, exactly: ``max_t Σ_{i: remaining_i >= t} ceil((context_i + t) / B)``.

    Each term is non-decreasing in ``t`` while its request lives, so the maximum is at some
    ``t = remaining_k``; there, writing ``context_i = B q_i + m_i`` and ``t = B a + b`` (``0 <= m_i, b < B``),
    ``ceil((context_i + t) / B) = q_i + a + [m_i + b > 0] + [m_i > B − b]``: with the requests taken longest
    first, every candidate ``t`` costs a sum of quotients and a few lookups in a histogram of the residues
    ``m_i`` (``O(n log n + n·B)`` for ``n`` requests, compiled: :func:`llmsched_env.kernels.peak_blocks`).
    """
    return int(kernels.peak_blocks(np.asarray(context, np.int64), np.asarray(remaining, np.int64), int(block_size)))
