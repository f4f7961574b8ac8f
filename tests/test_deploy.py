"""Deployment artefacts checked against the code they describe."""

from __future__ import annotations

import json
import re

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import consumers.metrics  # noqa: F401  (registers the metrics)
import steering.metrics  # noqa: F401
from tests.paths import REPO

ROOT = REPO


def _families() -> set[str]:
    return {f.name for f in text_string_to_metric_families(generate_latest().decode())}


def test_grafana_dashboard_uses_only_metrics_the_service_exports() -> None:
    dash = json.loads((ROOT / "deploy/grafana/steer-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\bsteer_[a-z_]+", e)}
    base = {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in used}
    missing = base - _families()
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
    # and every metric the service exports is on the dashboard
    steer = {f for f in _families() if f.startswith("steer_") and not f.endswith("_created")}
    unseen = steer - base
    assert not unseen, f"metrics missing from the dashboard: {sorted(unseen)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# -- compose stack and Kubernetes manifests (no container engine here: checked against the
#    code they configure) ---------------------------------------------------------------------

DEPLOY = ROOT / "deploy"


def _known_env() -> set[str]:
    """STEER_* variables the code reads: CLI options' envvars, direct reads and the
    service's limits."""
    import click
    import typer

    from steering.cli.app import app

    names: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            env = p.envvar
            names.update([env] if isinstance(env, str) else list(env or []))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    from steering.api.limits import ENV  # the service's request limits

    names.update(ENV.values())
    for package in ("simulations", "consumers", "model_server", "steering"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"environ(?:\.get)?\(\s*\"(STEER_[A-Z_]+)\"", path.read_text()))
    return names


def _topics(prefix: str) -> set[str]:
    from consumers.kafka import topics_for

    return {
        *topics_for(prefix),
        f"{prefix}_deadletter",
        f"{prefix}_advice",
        f"{prefix}_advice_docs",
        f"{prefix}_folded",  # scale-out: snapshots for the model-server replicas
        f"{prefix}_estimates",
    }


def _created_topics(script: str, prefix: str) -> set[str]:
    """Topics a kafka-topics.sh loop script creates (``for s in a b; do ... _$s``)."""
    out: set[str] = set()
    for words in re.findall(r"for s in ([\w ]+); do", script):
        out.update(f"{prefix}_{w}" for w in words.split())
    out.update(f"{prefix}_{w}" for w in re.findall(r"\{STEER_PREFIX\}_(\w+) ", script))
    return out


def test_compose_stack_matches_the_service() -> None:
    import yaml

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "kafka-init", "postgres", "steer", "prometheus", "grafana"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")  # the official image
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    steer = services["steer"]
    env = steer["environment"]
    known = _known_env()
    unknown = {k for k in env if k.startswith("STEER_")} - known
    assert not unknown, f"compose sets variables the service never reads: {unknown}"
    assert env["STEER_DATABASE_URL"].startswith("postgresql+psycopg://")
    # the scale-out workers (profile scale-out): a consumer group and model replicas
    assert services["consumer"]["command"][:2] == ["consume", "--group"]
    assert services["model"]["command"][0] == "model-serve"
    # the page, history and advisor of the scale-out workers follow the replicas
    assert services["steer-follow"]["command"] == ["serve", "--follow-replicas"]
    assert "STEER_INSTRUMENT_CONFIG" not in services["steer-follow"]["environment"]
    for name in ("consumer", "model", "steer-follow"):
        extra = set(services[name]["environment"]) - known
        assert not {k for k in extra if k.startswith("STEER_")}, (name, extra)
    prefix = env["STEER_PREFIX"]
    script = services["kafka-init"]["command"][0].replace("$$", "$")
    assert _created_topics(script, prefix) == _topics(prefix)
    assert steer["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    # Dockerfile copies what exists; Prometheus scrapes the service's port and path
    for src in re.findall(r"^COPY (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M):
        assert (ROOT / src).exists(), src
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"steer:{env['STEER_PORT']}"]
    # Grafana: the provisioned dashboard is the one in the repository
    mounts = services["grafana"]["volumes"]
    assert any(m.startswith("./grafana/steer-dashboard.json:") for m in mounts)
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/steer.yml").read_text())
    assert any(m.endswith(prov["providers"][0]["options"]["path"] + "/steer-dashboard.json:ro")
               for m in mounts)  # fmt: skip


def test_kubernetes_manifests() -> None:
    import yaml

    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s/steer.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    kinds["Deployment"] = by_name["Deployment", "steer"]
    kinds["PersistentVolumeClaim"] = by_name["PersistentVolumeClaim", "steer-state"]
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Job", "Deployment",
            "Service"} <= set(kinds)  # fmt: skip
    for d in docs:
        assert d["apiVersion"]
        assert d["metadata"]["name"]
    known = _known_env()
    config = {**kinds["ConfigMap"]["data"], **kinds["Secret"]["stringData"]}
    assert not {k for k in config if k.startswith("STEER_")} - known
    dep = kinds["Deployment"]["spec"]
    assert dep["strategy"]["type"] == "Recreate"  # one consumer per prefix at a time
    pod = dep["template"]["spec"]
    c = pod["containers"][0]
    port = c["ports"][0]["containerPort"]
    assert str(port) == config["STEER_PORT"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert c["volumeMounts"][0]["mountPath"] == config["STEER_STATE_DIR"]
    svc = kinds["Service"]["spec"]
    assert svc["selector"] == dep["selector"]["matchLabels"]
    script = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert _created_topics(script, config["STEER_PREFIX"]) == _topics(config["STEER_PREFIX"])
    # scale-out: a consumer group over the partitions on a shared volume, and stateless
    # model-server replicas; the run topics are created with the partitions they expect
    group = by_name["Deployment", "steer-consumer"]["spec"]
    args = group["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["consume", "--group"]
    n_parts = args[args.index("--partitions") + 1]
    assert group["replicas"] <= int(n_parts)
    shared = group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert by_name["PersistentVolumeClaim", shared]["spec"]["accessModes"] == ["ReadWriteMany"]
    model = by_name["Deployment", "steer-model"]["spec"]["template"]["spec"]
    assert model["containers"][0]["args"][0] == "model-serve"
    assert "volumes" not in model  # stateless
    follow = by_name["Deployment", "steer-follow"]["spec"]["template"]["spec"]["containers"][0]
    assert follow["args"] == ["serve", "--follow-replicas"]
    parts: dict[str, str] = {}
    loop: list[str] = []
    for line in script.splitlines():
        if m := re.search(r"for s in ([\w ]+); do", line):
            loop = m.group(1).split()
        elif m := re.search(r"--partitions (\d+)", line):
            named = re.findall(r"\{STEER_PREFIX\}_(\w+) ", line)
            parts.update(dict.fromkeys(named or loop, m.group(1)))
    for topic in ("events", "runInfo", "motion", "bluesky"):
        assert parts[topic] == n_parts, parts
