"""Shared fixtures. Each group lives in its own module, imported here."""

from tests.redis_fixtures import *  # noqa: F401,F403  (redis-server / sentinel / cluster)
from tests.proxy_fixtures import *  # noqa: F401,F403  (upstreams and proxies on loopback)
