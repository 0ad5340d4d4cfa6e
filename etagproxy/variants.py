"""Which representation a tag names (RFC 9110 §8.8.3.3, RFC 9111 §4.1). Pure.

A strong tag is `"<token>"` for the plain representation and
`"<token>-<variant>"` for the others: the variant says which query,
negotiated content type and content coding the representation was chosen
by. `Selected` keeps how a 2xx was selected, so that `short_circuit` can
tell whether another request would select it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from etagproxy.target import Target

__all__ = ["NOT_MODIFIED_FIELDS", "Selected", "query_variant", "representation_variant"]

# RFC 9110 §15.4.5: a 304 carries these fields when a 200 would have.
NOT_MODIFIED_FIELDS = ("Cache-Control", "Content-Location", "Date", "Expires", "Vary")
# What `short_circuit` remembers of a representation's 2xx (Date is the 304's own).
SELECTED_FIELDS = frozenset(name.lower() for name in NOT_MODIFIED_FIELDS) - {"date"}


@dataclass(frozen=True, slots=True)
class Selected:
    """How a 2xx read selected one representation, kept per process so that
    `short_circuit` can answer 304 for it without the upstream.

    RFC 9111 §4.1: a response stands in for another request only if the
    request fields its `Vary` names match. RFC 9110 §15.4.5: the 304 carries
    the Cache-Control, Content-Location, Expires and Vary the 200 would.
    Another process (a replica on the same Redis) has no record and forwards.
    """

    qpart: str
    """The query part of the tag (the non-key parameters)."""
    vary: tuple[tuple[str, tuple[str, ...]], ...] | None
    """Each field `Vary` named (lower case) with the request's values; None for `Vary: *`."""
    fields: tuple[tuple[str, str], ...]
    """The 2xx's lines of SELECTED_FIELDS."""

    @classmethod
    def of(cls, qpart: str, request: CIMultiDictProxy[str], response: CIMultiDict[str]) -> Selected:
        names = sorted(
            {f.strip().lower() for line in response.getall("Vary", ()) for f in line.split(",") if f.strip()}
        )
        vary = None if "*" in names else tuple((n, tuple(request.getall(n, ()))) for n in names)
        fields = tuple((k, v) for k, v in response.items() if k.lower() in SELECTED_FIELDS)
        return cls(qpart, vary, fields)

    def selects(self, qpart: str, request: CIMultiDictProxy[str]) -> bool:
        """Whether `request` would select this representation again."""
        return (
            self.vary is not None
            and qpart == self.qpart
            and all(tuple(request.getall(n, ())) == values for n, values in self.vary)
        )


def _short_hash(data: str, size: int) -> str:
    return hashlib.blake2b(data.encode("utf-8", "surrogateescape"), digest_size=size).hexdigest()


def query_variant(target: Target, key_query: Collection[str]) -> str:
    """The part of a representation tag chosen by non-key query parameters.

    `key_query` holds the names in canonical encoded form (`Route.key_query`),
    the spelling `Target.params()` yields.
    """
    if not target.query:
        return ""
    extra = sorted(f"{n}={v}" for n, v in target.params() if n not in key_query)
    return "q" + _short_hash("&".join(extra), 4) if extra else ""


def representation_variant(
    qpart: str, up_headers: MultiMapping[str], plain_types: Collection[str] = ("application/json",),
) -> str:
    """`<variant>` of `"<token>-<variant>"`; '' for the plain representation.

    RFC 9110 §8.8.3.3: representations that differ (query, negotiated
    content type, content coding) must not share a strong validator.
    The content type counts only when the upstream says it negotiates on
    Accept (`Vary`), and not for the `plain_types` it serves by default
    (JSON for DRF and NetBox: no Accept, `*/*`, `application/json` all get
    the same bytes), so the default representation carries the plain tag a
    write returns; the content coding always counts.
    """
    get = up_headers.get
    getall = up_headers.getall
    parts = [qpart] if qpart else []
    # List fields may come as several lines (RFC 9110 §5.3).
    vary = ", ".join(getall("Vary", ()))
    if vary:
        fields = {f.strip().lower() for f in vary.split(",")}
        if "accept" in fields or "*" in fields:
            content_type = get("Content-Type", "")
            if content_type.partition(";")[0].strip().lower() not in plain_types:
                parts.append("t" + _short_hash(content_type, 3))
    coding = ", ".join(getall("Content-Encoding", ()))
    if coding:
        codings = [c.strip().lower() for c in coding.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if codings:
            joined = ".".join(codings)
            parts.append("e" + (joined if joined.isalnum() or _tchars(joined) else _short_hash(joined, 3)))
    return "-".join(parts)


def _tchars(value: str) -> bool:
    return all(c.isalnum() or c in "._" for c in value)
