"""What an upstream's answer to a forwarded write says about the resource.

Pure rules, no I/O: the write path asks `write_outcome` once per forwarded
write and commits by the answer (DESIGN.md §2.4):

- SUCCESS: the change was applied; END mints a new token.
- REJECTED: nothing changed; END keeps the committed token.
- UNKNOWN: the change may have been applied; END mints a new token and the
  client is told nothing it could use as a validator.

A wrong REJECTED is the dangerous mistake: the tag read before the write
keeps validating, and a second client's stale write is forwarded over the
change (a lost update). A wrong SUCCESS or UNKNOWN only costs a spurious 412.
So only answers that say the request was refused before it was processed
count as REJECTED.
"""

from __future__ import annotations

from etagproxy.store.base import Outcome

__all__ = ["write_outcome", "validators_allowed"]


def write_outcome(status: int) -> Outcome:
    """The outcome of a write the upstream answered with `status`.

    - 2xx: applied.
    - 303 See Other: applied. RFC 9110 §15.4.4: a 303 to an unsafe method
      redirects to an indirect response to it, which is how
      Post/Redirect/Get answers a write that succeeded.
    - any other 3xx: unknown. 301/302 are what web frameworks send after a
      form write succeeded (Django's `redirect()` answers 302), and also
      what a login redirect looks like; 307/308 say the request was not
      processed here, but an upstream that applied it first cannot be ruled
      out from the outside. Minting costs a re-read; keeping the token can
      cost a lost update.
    - 4xx: rejected (RFC 9110 §15.5: the client's request was refused).
    - 5xx and anything else: unknown.
    """
    if 200 <= status < 300 or status == 303:
        return Outcome.SUCCESS
    if 400 <= status < 500:
        return Outcome.REJECTED
    return Outcome.UNKNOWN


def validators_allowed(status: int) -> bool:
    """Whether a write answered `status` may carry the proxy's ETag and
    Last-Modified (and be recorded for an Idempotency-Key replay): only a
    2xx describes the resource's new state. A 303's validators would
    describe the redirect, not the resource it points to."""
    return 200 <= status < 300
