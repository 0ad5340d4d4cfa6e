"""The admin endpoint's Prometheus text exposition, parsed for assertions."""

from __future__ import annotations

from typing import NamedTuple

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Sample", "metric", "parse_metrics", "scrape", "value"]


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a text-format exposition."""
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def scrape(admin_url: str) -> tuple[str, list[Sample]]:
    """(Content-Type, samples) of `admin_url`/metrics, which must answer 200."""
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
            content_type = resp.headers["Content-Type"]
    return content_type, parse_metrics(text)


def _matching(samples: list[Sample], name: str, labels: dict[str, str]) -> list[float]:
    return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]


def metric(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    return sum(_matching(samples, name, labels))


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """Like `metric`, but at least one such sample must exist."""
    found = _matching(samples, name, labels)
    assert found, f"no sample {name}{labels}"
    return sum(found)
