"""Build the Dockerfile with podman, run the image and ask it.

No registry is reachable from the test machines, so the official python
image is stood in for by a base made here from Debian packages:
debootstrap (minbase) of the release the Dockerfile's default names, with
python3-venv and a venv at /opt/python first on PATH (the official image's
/usr/local/bin: `python` and `pip` there, pip free to install). That rootfs
is cached as a tarball under /var/tmp/etagproxy-image, keyed by the release
and the recipe, and imported once into podman's store. A thin layer on top
adds this machine's CA bundle as PIP_CERT, because TLS to the package index
may pass an intercepting proxy that only the host trusts.

The image itself is built from the repository as it is (podman's layer
cache makes a rebuild cheap), run with host networking, so that its
upstream can be a loopback server of this test, and checked: /healthz
answers, a proxied GET gets a strong ETag and a 304 on revalidation, the
process runs as the Dockerfile's non-root user, the image's HEALTHCHECK
command succeeds inside, and SIGTERM stops it with status 0.

Skipped, with the missing piece named, only where podman or debootstrap
cannot run here.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ETAGPROXY_IMAGE_CACHE", "/var/tmp/etagproxy-image"))
PACKAGES = ("python3", "python3-venv", "ca-certificates")
VENV = "/opt/python"
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE = "localhost/etagproxy:test"
HEALTH_DEADLINE = 30.0
# The Dockerfile's admin port, which its HEALTHCHECK asks.
IMAGE_ADMIN_PORT = 9901


def dockerfile_release() -> str:
    """The Debian release of the Dockerfile's default base (python:3.12-slim-bookworm)."""
    found = re.search(r"^ARG PYTHON_IMAGE=\S*-(\w+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return found.group(1) if found else "bookworm"


def debian_mirror(release: str) -> str:
    """The Debian archive this machine's apt uses for `release` (deb822 or one-line sources)."""
    sources = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list")), *sorted(sources.glob("*.sources"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):[ \t]*(.*)$", stanza, re.MULTILINE))
            if fields.get("Types", "deb").split()[0] == "deb" and release in fields.get("Suites", "").split():
                for uri in fields.get("URIs", "").split():
                    if not uri.rstrip("/").endswith("-security"):
                        return uri
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == release:
                return words[1]
    return "http://deb.debian.org/debian"


def run(argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def hard_limit(which: int, cap: int) -> int:
    hard = resource.getrlimit(which)[1]
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


class Podman:
    """podman with the OCI runtime that works here and rlimits it may set.

    Rootful podman asks for nofile and nproc rlimits above the hard limits
    a process in a container may have (the runtime gets EPERM: nproc 32768
    works on the test machines, their shell's 96367 does not), and crun
    1.8 refuses a hybrid cgroup v1/v2 host; both show up as a failed
    trivial run, so runtimes are tried in turn with explicit rlimits.
    """

    def __init__(self, runtime: str) -> None:
        self.runtime = runtime
        nofile, nproc = hard_limit(resource.RLIMIT_NOFILE, 1 << 20), hard_limit(resource.RLIMIT_NPROC, 4096)
        self.ulimits = ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", "--runtime", self.runtime, *args], timeout=timeout, check=check)


def podman_or_skip(probe_image: str) -> Podman:
    errors = []
    for runtime in ("crun", "runc"):
        if shutil.which(runtime) is None:
            errors.append(f"{runtime}: not installed")
            continue
        podman = Podman(runtime)
        done = podman("run", "--rm", *podman.ulimits, "--network=host", probe_image, "true", timeout=60, check=False)
        if done.returncode == 0:
            return podman
        errors.append(f"{runtime}: {last_line(done)}")
    pytest.skip("podman cannot run a container here: " + "; ".join(errors))


def raw_base(release: str) -> str:
    """debootstrap + venv, imported once; the tarball outlives podman's store."""
    recipe = json.dumps([release, PACKAGES, VENV, PATH, "v1"])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    tag = f"localhost/debian-minbase-python:{release}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if run(["podman", "image", "exists", tag], timeout=30, check=False).returncode == 0:
            return tag
        tarball = CACHE / f"debian-{release}-{key}.tar"
        if not tarball.exists():
            if shutil.which("debootstrap") is None:
                pytest.skip("debootstrap is not installed: it builds the Debian base image (apt-get install debootstrap)")
            if os.geteuid() != 0:
                pytest.skip("debootstrap needs root to build the Debian base image")
            work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
            try:
                root = work / "root"
                mirror = debian_mirror(release)
                run(["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), release, str(root), mirror], timeout=1200)
                run(["chroot", str(root), "python3", "-m", "venv", VENV], timeout=300)
                for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
                    for item in (root / leftovers).glob("*"):
                        if item.is_file():
                            item.unlink()
                run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(work / "rootfs.tar"), "."], timeout=600)
                (work / "rootfs.tar").rename(tarball)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        run(["podman", "import", "--change", f"ENV PATH={PATH}", "--change", 'CMD ["python"]', str(tarball), tag], timeout=600)
    return tag


def base_with_host_trust(raw: str, release: str, tmp: Path) -> str:
    """`raw` plus this machine's CA bundle for pip; cached by podman's layer cache."""
    tag = f"localhost/debian-python:{release}"
    lines = [f"FROM {raw}"]
    if HOST_CA_BUNDLE.is_file():
        shutil.copy(HOST_CA_BUNDLE, tmp / "host-ca-certificates.crt")
        lines += [
            "COPY host-ca-certificates.crt /etc/ssl/certs/host-ca-certificates.crt",
            "ENV PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt",
        ]
    (tmp / "Containerfile").write_text("\n".join(lines) + "\n")
    run(["podman", "build", "--quiet", "-t", tag, str(tmp)], timeout=300)
    return tag


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_image_builds_on_a_local_debian_base_and_serves(upstream: int, tmp_path: Path):
    started = time.monotonic()
    timings: dict[str, float] = {}
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc debootstrap)")
    info = run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], timeout=60, check=False)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {last_line(info)}")

    release = dockerfile_release()
    mark = time.monotonic()
    raw = raw_base(release)
    timings["base"] = time.monotonic() - mark
    podman = podman_or_skip(raw)
    (tmp_path / "base").mkdir()
    mark = time.monotonic()
    base = base_with_host_trust(raw, release, tmp_path / "base")
    podman(
        "build", "--format", "docker", *podman.ulimits, "--build-arg", f"PYTHON_IMAGE={base}", "-t", IMAGE, str(ROOT),
        timeout=1200,
    )
    timings["image build"] = time.monotonic() - mark

    listen, admin = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{listen}\n"
        f"admin_listen: 127.0.0.1:{admin}\n"
        f"upstream: http://127.0.0.1:{upstream}\n"
        "store: memory://\n"
        "timeouts: {shutdown: 5s}\n"
        "routes:\n"
        "  - path: /items/{id}\n"
    )
    config.chmod(0o644)
    name = f"etagproxy-test-{os.getpid()}"
    mark = time.monotonic()
    podman(
        "run", "--detach", "--name", name, "--network=host", *podman.ulimits, "--health-interval=disable",
        "--volume", f"{config}:/etc/etagproxy/config.yaml:ro", IMAGE,
    )
    try:
        deadline = time.monotonic() + HEALTH_DEADLINE
        while True:
            try:
                status, _, body = get(f"http://127.0.0.1:{admin}/healthz")
                if status == 200:
                    break
            except OSError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = podman("logs", name, check=False)
                raise AssertionError(f"no /healthz within {HEALTH_DEADLINE}s (container {state}):\n{logs.stdout}{logs.stderr}")
            time.sleep(0.2)
        timings["healthy after start"] = time.monotonic() - mark

        status, headers, body = get(f"http://127.0.0.1:{listen}/items/7")
        assert status == 200 and json.loads(body) == {"path": "/items/7"}
        etag = headers.get("ETag", "")
        assert re.fullmatch(r'"[^"]+"', etag), f"a strong ETag, got {etag!r}"
        status, headers, _ = get(f"http://127.0.0.1:{listen}/items/7", {"If-None-Match": etag})
        assert status == 304 and headers.get("ETag") == etag

        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        uids = re.search(r"^Uid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
        assert uids and set(uids.group(1).split()) == {"10001"}, "the proxy itself runs as 10001"

        # The image's own HEALTHCHECK, pointed at this run's admin port.
        check = json.loads(podman("image", "inspect", "--format", "{{json .HealthCheck}}", IMAGE).stdout)
        assert check["Test"][0] == "CMD"
        command = [arg.replace(f":{IMAGE_ADMIN_PORT}/", f":{admin}/") for arg in check["Test"][1:]]
        assert command != check["Test"][1:]
        podman("exec", name, *command, timeout=30)

        podman("stop", "--time", "15", name, timeout=60)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        podman("rm", "--force", "--time", "5", name, timeout=60, check=False)
    timings["test"] = time.monotonic() - started
    print(f"podman --runtime {podman.runtime}; image timings: " + ", ".join(f"{what} {seconds:.1f}s" for what, seconds in timings.items()))
