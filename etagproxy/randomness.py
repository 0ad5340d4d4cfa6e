"""Random bytes for tokens, lease owners and request ids, without a system
call per use.

`os.urandom` costs one `getrandom` system call per call; a write used five
of them (request id, lease owner, BEGIN call id, two candidate tokens). The
bytes are drawn from the same source in blocks and handed out in order, so
each value is as unpredictable as before. A forked child starts with an
empty block: two workers never hand out the same bytes.
"""

from __future__ import annotations

import os

BLOCK = 4096


class _Pool:
    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def reset(self) -> None:
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end > len(self.buf):
            self.buf = os.urandom(max(BLOCK, n))
            pos, end = 0, n
        self.pos = end
        return self.buf[pos:end]


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.reset)


def random_bytes(n: int) -> bytes:
    """`n` bytes from the operating system's CSPRNG (buffered)."""
    return _pool.take(n)


def random_hex(n: int) -> str:
    """`n` random bytes as 2n lower-case hex digits."""
    return _pool.take(n).hex()
