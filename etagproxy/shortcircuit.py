"""`short_circuit`: answer a current If-None-Match with 304 from the store.

No I/O: the store's observation of the key (its version, and whether these
credentials got a 2xx for it within `short_circuit_ttl`) is taken by the
read path; this decides whether that is enough to skip the upstream, from
how each tag's representation was selected (`variants.Selected`), which is
kept per process, bounded, least recently used first out, together with
the header lines of the 304 it allows (`shaping.not_modified_lines`), so a
short circuit builds no header map per answer.
"""

from __future__ import annotations

from collections import OrderedDict

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from etagproxy.config import RouteConfig
from etagproxy.etag import EntityTag, parse_tag_list
from etagproxy.exchange import Exchange
from etagproxy.preconditions import Conditionals
from etagproxy.shaping import from_lines, not_modified_lines
from etagproxy.store.base import Observation
from etagproxy.variants import Selected

__all__ = ["SELECTED_MAX", "ShortCircuit"]

SELECTED_MAX = 10_000


class ShortCircuit:
    """The selections seen by this process, and the 304s they allow."""

    def __init__(self, via: str, size: int = SELECTED_MAX) -> None:
        self.via = via
        self.size = size
        self.selected: OrderedDict[tuple[str, str], tuple[Selected, tuple[tuple[str, str], ...]]] = OrderedDict()
        """(key, opaque tag) -> how it was selected, and its 304's header lines."""

    def remember(self, key: str, tag: EntityTag, selected: Selected) -> None:
        """Keep how `tag` was selected (bounded, LRU)."""
        lines = not_modified_lines(CIMultiDict(selected.fields), EntityTag(tag.opaque), self.via)
        self.selected[(key, tag.opaque)] = (selected, lines)
        self.selected.move_to_end((key, tag.opaque))
        if len(self.selected) > self.size:
            self.selected.popitem(last=False)

    def answer(
        self, request_headers: CIMultiDictProxy[str], ex: Exchange, cfg: RouteConfig, cond: Conditionals,
        obs: Observation, qpart: str,
    ) -> web.Response | None:
        """304 from the store when it is safe to skip the upstream, else None.

        `cond` is parsed from `request_headers`; `qpart` is the request's
        query variant (`variants.query_variant`)."""
        if not (cfg.public or obs.reader_seen):
            return None
        if cond.if_match is not None or cond.if_unmodified_since is not None:
            return None
        tags = parse_tag_list(cond.if_none_match)
        if tags is None or tags.any or tags.malformed:
            return None
        token = obs.version.token
        for tag in tags.tags:
            # The version must be current, and this request must select the
            # representation the tag was given to (weak comparison, §13.1.2).
            seen = self.selected.get((ex.key, tag.opaque)) if tag.token == token else None
            if seen is None or not seen[0].selects(qpart, request_headers):
                continue
            ex.decision = "short_circuit"
            return from_lines(ex.rid, seen[1])
        return None
