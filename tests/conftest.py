"""Shared fixtures. Each group lives in its own module, imported here."""

import os

from hypothesis import settings

from tests.drf_fixtures import *  # noqa: F401,F403  (a real Django REST Framework API)
from tests.proxy_fixtures import *  # noqa: F401,F403  (upstreams and proxies on loopback)
from tests.proxy_processes import processes, proxies  # noqa: F401  (`etagproxy run` child processes)
from tests.redis_fixtures import *  # noqa: F401,F403  (redis-server / sentinel / cluster)

# In CI, property tests draw the same examples on every run, so a landing is
# judged on the code, not on which corner a random seed found that day;
# locally they keep exploring (and remember what failed).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
