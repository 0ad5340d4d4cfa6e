#!/usr/bin/env bash
# The test command from README.md: installs redis-server (the suite starts
# real Redis, Sentinel and Cluster processes on loopback ports), promtool, libfaketime and the
# Python test dependencies into .venv, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)  # promtool checks deploy/monitoring
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || need_apt+=(libfaketime)  # one process's clock stepped
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Optional: large, or not runnable everywhere. A machine that cannot install
# them runs everything else, and the tests that need them say why.
optional_apt() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null 2>&1 && return 0
  $SUDO apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null 2>&1
}
# The image, built and run with podman on a local Debian base
# (tests/test_image.py; runc because crun cannot run on a hybrid cgroup host).
if ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  optional_apt podman runc debootstrap || echo "scripts/test.sh: podman not installed; the image test will skip" >&2
fi
# A real browser renders the admin status page (about 300 MB).
if ! command -v chromium >/dev/null 2>&1; then
  optional_apt --no-install-recommends chromium \
    || echo "scripts/test.sh: chromium not installed; the status page's browser test will skip" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,otel]'
exec .venv/bin/python -m pytest "$@"
