#!/usr/bin/env bash
# Validates the deployment files, offline and schema-aware, printing one line per check:
#
#   - every manifest in deploy/kubernetes/ against the Kubernetes OpenAPI schemas of each
#     version in KUBERNETES_VERSIONS, strictly (an unknown or misspelt field is an error, and
#     so is a kind or apiVersion the version does not know); kustomization.yaml lists files
#     that exist; the ConfigMap and the containers set only RELAY_* variables that
#     deploy/relay.toml documents; deployment.yaml and statefulset.yaml share one pod template;
#     each one's terminationGracePeriodSeconds covers the relay's stop with the ConfigMap's
#     settings (and deploy/relay.toml's defaults for the rest);
#   - what `kubectl apply -k deploy/kubernetes` applies, rendered here (the kustomization's
#     resources, in order, with its namespace; any other kustomize feature is refused until
#     this check learns it): no Secret (so applying never replaces the real one with
#     placeholders), no REPLACE-ME, and the StatefulSet as the one workload;
#   - docker-compose.yml against the Compose Specification schema, its build targets against
#     the stages of deploy/Dockerfile;
#
# (deploy/rabbitmq/definitions.json is checked against what the relay declares by a unit test
# of src/amqp/topology.rs, from the relay's own code.)
#
# Usage: deploy/validate.sh                  exit status 0 when every check passes, 1 otherwise
#        KUBERNETES_VERSIONS="1.30" deploy/validate.sh
#
# Needs python3 with the venv module (Debian: apt-get install python3-venv). The first run
# installs pinned packages from PyPI into target/validate-venv (about 30 s); after that it
# needs no network and takes a few seconds. The schemas come inside the packages:
# kubernetes-validate bundles the Kubernetes JSON schemas, check-jsonschema the Compose
# Specification's (with its license).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The oldest Kubernetes these manifests support (PodDisruptionBudget's
# unhealthyPodEvictionPolicy is on by default from 1.27) and the newest the package knows.
KUBERNETES_VERSIONS="${KUBERNETES_VERSIONS:-1.27 1.37}"

VENV=target/validate-venv
REQUIREMENTS=(
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "PyYAML>=6"
)

python=$(command -v python3 || true)
if [[ -z $python ]]; then
  echo "error: python3 not found (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi

# Reinstall only when the requirements (or the interpreter) changed.
stamp="$("$python" --version 2>&1) ${REQUIREMENTS[*]}"
if [[ ! -x $VENV/bin/python || ! -f $VENV/.installed || "$(cat "$VENV/.installed")" != "$stamp" ]]; then
  echo "installing the validators into $VENV"
  mkdir -p target
  if ! "$python" -m venv --clear "$VENV"; then
    echo "error: cannot create a virtual environment (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
  printf '%s' "$stamp" >"$VENV/.installed"
fi

KUBERNETES_VERSIONS="$KUBERNETES_VERSIONS" exec "$VENV/bin/python" - <<'PY'
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

VERSIONS = os.environ["KUBERNETES_VERSIONS"].split()
KUBERNETES_DIR = Path("deploy/kubernetes")
failures = 0


def report(ok, subject, detail):
    global failures
    if not ok:
        failures += 1
    print(f"{'ok  ' if ok else 'FAIL'}  {subject}: {detail}", flush=True)


def load_yaml(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# ---- Kubernetes ----------------------------------------------------------------------------

def check_kubernetes_object(doc):
    """Problems of one object against every version's strict schema; [] when it is valid."""
    problems = []
    for version in VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "(top level)"
            problems.append(f"Kubernetes {version}: {where}: {err.message}")
        except kv.SchemaNotFoundError as err:
            problems.append(err.message)
        except kv.VersionNotSupportedError as err:
            problems.append(err.message)
    return problems


def check_kustomization(path, doc):
    problems = []
    for entry in doc.get("resources", []):
        if not (path.parent / entry).exists():
            problems.append(f"resources: {entry} does not exist")
    return problems


documented_env = set(re.findall(r"RELAY_[A-Z0-9]+__[A-Z0-9_]+", Path("deploy/relay.toml").read_text()))


def relay_env_problems(doc):
    """RELAY_* names the relay would refuse at startup (it rejects unknown ones)."""
    names = []
    if doc.get("kind") == "ConfigMap":
        names = list((doc.get("data") or {}).keys())
    pod = (doc.get("spec") or {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        names += [env["name"] for env in container.get("env", [])]
    return [
        f"{name} is not a setting documented in deploy/relay.toml"
        for name in names
        if name.startswith("RELAY_") and name not in documented_env
    ]


pod_templates = {}
manifests = sorted(p for p in KUBERNETES_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))
if not manifests:
    report(False, KUBERNETES_DIR, "no manifests found")
for path in manifests:
    try:
        docs = load_yaml(path)
    except yaml.YAMLError as err:
        report(False, path, f"not valid YAML: {err}")
        continue
    names, problems, schema_checked = [], [], False
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append("a document without kind and apiVersion")
            continue
        if doc["apiVersion"].startswith("kustomize.config.k8s.io/"):
            names.append(f"{doc['kind']} (its resources exist)")
            problems += check_kustomization(path, doc)
            continue
        name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
        names.append(name)
        schema_checked = True
        problems += [f"{name}: {p}" for p in check_kubernetes_object(doc)]
        problems += [f"{name}: {p}" for p in relay_env_problems(doc)]
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod_templates[(path.name, doc["kind"])] = doc["spec"]["template"]
    if problems:
        for problem in problems:
            report(False, path, problem)
    else:
        checked = f" (Kubernetes {', '.join(VERSIONS)}, strict)" if schema_checked else ""
        report(True, path, f"{', '.join(names)}{checked}")

# The StatefulSet is the Deployment with a claim per pod instead of an emptyDir for the spool.
deployment = pod_templates.get(("deployment.yaml", "Deployment"))
statefulset = pod_templates.get(("statefulset.yaml", "StatefulSet"))
if deployment and statefulset:
    expected = json.loads(json.dumps(deployment))
    expected["spec"]["volumes"] = [v for v in expected["spec"]["volumes"] if v["name"] != "spool"]
    report(
        expected == statefulset,
        "deployment.yaml, statefulset.yaml",
        "same pod template but for the spool volume"
        if expected == statefulset
        else "pod templates differ (beyond the spool volume): keep them in step",
    )

# A stop takes at most: the preStop hook, the HTTP drain, a confirm timeout for deliveries
# still under way and one for the replay batch under way, then replaying the spool to the
# broker. Settings come from the ConfigMap, else from deploy/relay.toml's defaults (each key
# is listed there, commented out, at its default).
def documented_defaults():
    defaults, section = {}, None
    for line in Path("deploy/relay.toml").read_text().splitlines():
        if m := re.match(r"\[(\w+)\]\s*$", line):
            section = m.group(1)
        elif (m := re.match(r"#\s*(\w+)\s*=\s*(\d+)\s*$", line)) and section:
            defaults[f"{section}.{m.group(1)}"] = int(m.group(2))
    return defaults


configmap = next(
    doc for doc in load_yaml(KUBERNETES_DIR / "configmap.yaml") if doc.get("kind") == "ConfigMap"
)["data"]
defaults = documented_defaults()


def setting_ms(key):
    section, name = key.split(".")
    env = f"RELAY_{section.upper()}__{name.upper()}"
    # A key the relay does not have (yet) adds nothing to the stop.
    return int(configmap.get(env, defaults.get(key, 0)))


def pre_stop_secs(container):
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = (pre_stop.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0].endswith("sleep"):
        return int(command[1])
    return 0


for (file, kind), template in sorted(pod_templates.items()):
    pod = template["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    parts = {
        "preStop": max(pre_stop_secs(c) for c in pod["containers"]),
        "drain": setting_ms("http.drain_timeout_ms") / 1000,
        "2 x confirm": 2 * setting_ms("amqp.confirm_timeout_ms") / 1000,
        "shutdown replay": setting_ms("spool.shutdown_replay_timeout_ms") / 1000,
    }
    stop = sum(parts.values())
    detail = " + ".join(f"{name} {value:g}" for name, value in parts.items())
    report(
        grace > stop,
        f"{KUBERNETES_DIR / file}",
        f"terminationGracePeriodSeconds {grace} "
        + ("covers" if grace > stop else "does NOT cover")
        + f" a stop of {stop:g} s ({detail})",
    )

# ---- What `kubectl apply -k` applies ----------------------------------------------------------

# The kustomize features rendered below; anything else in the kustomization is refused, so
# that this check never passes by rendering something other than kustomize would.
RENDERED = {"apiVersion", "kind", "namespace", "resources", "images"}


def render(kustomization_path):
    doc = load_yaml(kustomization_path)[0]
    unknown = sorted(set(doc) - RENDERED)
    if unknown:
        return None, f"uses {', '.join(unknown)}, which this check does not render: teach it"
    objects = []
    for entry in doc.get("resources", []):
        path = kustomization_path.parent / entry
        if not path.is_file():
            return None, f"resources: {entry} is not a file of this directory"
        for obj in load_yaml(path):
            obj = copy.deepcopy(obj)
            if doc.get("namespace") and obj.get("kind") != "Namespace":
                obj.setdefault("metadata", {})["namespace"] = doc["namespace"]
            objects.append(obj)
    return objects, None


kustomization = KUBERNETES_DIR / "kustomization.yaml"
objects, why = render(kustomization)
if objects is None:
    report(False, kustomization, why)
else:
    names = [f"{o['kind']}/{o['metadata']['name']}" for o in objects]
    problems = [f"applies {n}: keep secrets out of the applied set" for n in names if n.startswith("Secret/")]
    if "REPLACE-ME" in yaml.safe_dump_all(objects):
        problems.append("applies a placeholder value (REPLACE-ME)")
    workloads = [n for n in names if n.split("/")[0] in ("Deployment", "StatefulSet", "DaemonSet")]
    if workloads != ["StatefulSet/hirehop-relay"]:
        problems.append(f"applies {workloads or 'no workload'}, not the StatefulSet alone")
    for problem in problems:
        report(False, f"{kustomization} (rendered)", problem)
    if not problems:
        report(True, f"{kustomization} (rendered)", f"{', '.join(names)}: no Secret, no placeholder")

# ---- Compose --------------------------------------------------------------------------------

compose = Path("docker-compose.yml")
result = subprocess.run(
    [
        str(Path(sys.executable).parent / "check-jsonschema"),
        "--builtin-schema", "vendor.compose-spec",
        "--output-format", "text",
        str(compose),
    ],
    capture_output=True,
    text=True,
)
if result.returncode != 0:
    for line in (result.stdout + result.stderr).strip().splitlines():
        report(False, compose, line.strip())
else:
    problems = []
    stages = set(
        re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", Path("deploy/Dockerfile").read_text())
    )
    services = load_yaml(compose)[0]["services"]
    for name, service in services.items():
        build = service.get("build")
        if isinstance(build, dict) and build.get("target") and build["target"] not in stages:
            problems.append(f"service {name}: build target {build['target']} is not a stage of deploy/Dockerfile")
        for dependency in service.get("depends_on") or {}:
            if dependency not in services:
                problems.append(f"service {name}: depends_on unknown service {dependency}")
    for problem in problems:
        report(False, compose, problem)
    if not problems:
        report(True, compose, "Compose Specification schema, build targets, depends_on")

if failures:
    print(f"{failures} problem(s) found", file=sys.stderr)
    sys.exit(1)
PY
