#!/usr/bin/env python3
"""Validates rendered Arrowport manifests; run by .ci/helm-checks inside its venv.

Subcommands:
  k8s FILE...             every document against the Kubernetes JSON schemas (kubernetes-validate, strict:
                          unknown fields are errors), ServiceMonitors and PrometheusRules against a strict
                          schema derived from the Prometheus Operator's monitoring.coreos.com/v1 types,
                          ArrowportStreams against the CRD
  policy FILE...          what the chart promises: hardened pods, the operator-owned streams ConfigMap rendered
                          without data, at most one replica per DuckDB file or local lake catalog (several only
                          for a PostgreSQL-catalog lake with its data on a shared claim), a lake's files on
                          mounted volumes and its extensions from the image, no catalog password in a
                          ConfigMap, the contract's names and labels
  examples --crd CRD FILE...
                          ArrowportStream examples against the CRD's openAPIV3Schema, CEL rules included

Exit status 1 on any failure, with one line per problem.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the schemas know.
OLDEST_KUBERNETES = "1.29.0"
# Where the image keeps the DuckDB extensions a DuckLake needs (Dockerfile).
IMAGE_EXTENSIONS = "/usr/local/lib/arrowport/extensions"


def load_docs(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for doc in yaml.safe_load_all(f):
            if doc:
                yield doc


def describe(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{doc.get('kind')} {ns}{meta.get('name')}"


# --- CRD schemas ---------------------------------------------------------------------------------------


def structural_to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """Turns a CRD's structural OpenAPI v3 schema into JSON Schema with the API server's strictness:
    unknown fields are errors (kubectl's default --validate=strict), `nullable` admits null,
    `x-kubernetes-int-or-string` admits both."""
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = node.get("anyOf") or [{"type": "integer"}, {"type": "string"}]
            if node.get("nullable") and "type" in node:
                node["type"] = [node["type"], "null"]
            if (
                node.get("type") in ("object", ["object", "null"])
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    # The API server validates metadata itself; the CRD schema may only say `type: object`.
    out.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
    out["properties"].setdefault("apiVersion", {"type": "string"})
    out["properties"].setdefault("kind", {"type": "string"})
    return out


def cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Evaluates the schema's x-kubernetes-validations (CEL) rules on the value, as the API server would;
    transition rules (oldSelf) need an old object and are skipped."""
    import celpy

    errors = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" in rule["rule"]:
            continue
        env = celpy.Environment()
        try:
            result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as err:  # a rule the evaluator cannot run is a failure, not a pass
            errors.append(f"{path or '(root)'}: cannot evaluate CEL rule {rule['rule']!r}: {err}")
            continue
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            errors.append(f"{path or '(root)'}: {message} (CEL rule)")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            child = properties.get(key) or (additional if isinstance(additional, dict) else None)
            if child is not None:
                errors += cel_errors(child, item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}.{index}")
    return errors


class CrdSchemas:
    def __init__(self, crd_paths: list[Path]):
        self.by_gvk: dict[tuple[str, str], dict[str, Any]] = {}
        self.raw: dict[tuple[str, str], dict[str, Any]] = {}
        for path in crd_paths:
            for crd in load_docs(path):
                if crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    schema = version.get("schema", {}).get("openAPIV3Schema")
                    if schema:
                        self.by_gvk[(f"{group}/{version['name']}", kind)] = structural_to_jsonschema(schema)
                        self.raw[(f"{group}/{version['name']}", kind)] = schema

    def validate(self, doc: dict[str, Any]) -> list[str]:
        schema = self.by_gvk.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            return [f"no CRD version serves apiVersion {doc.get('apiVersion')} kind {doc.get('kind')}"]
        errors = []
        if not (doc.get("metadata") or {}).get("name"):
            errors.append("metadata.name is missing")
        validator = jsonschema.Draft7Validator(schema)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in err.absolute_path) or "(root)"
            errors.append(f"{path}: {err.message}")
        if not errors:
            errors += cel_errors(self.raw[(doc["apiVersion"], doc["kind"])], doc)
        return errors


# --- ServiceMonitor, PrometheusRule ---------------------------------------------------------------------


def monitoring_schema(kind: str) -> dict[str, Any]:
    """A strict JSON schema of a monitoring.coreos.com/v1 kind (ServiceMonitor, PrometheusRule), derived from
    the Prometheus Operator API types as packaged (pydantic models generated from the CRDs) by
    cloudcoil.models.prometheus_operator."""
    from cloudcoil.models.prometheus_operator import v1

    schema = getattr(v1, kind).model_json_schema(by_alias=True, mode="validation")

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"const": "monitoring.coreos.com/v1"}
    schema["properties"]["kind"] = {"const": kind}
    return schema


# --- subcommands ---------------------------------------------------------------------------------------


def cmd_k8s(files: list[Path], crds: list[Path]) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate import utils as kv

    versions = [OLDEST_KUBERNETES, kv.latest_version()]
    crd_schemas = CrdSchemas(crds)
    monitoring_schemas: dict[str, dict[str, Any]] = {}
    problems = []
    counts: dict[str, int] = {}
    for path in files:
        for doc in load_docs(path):
            name = f"{path}: {describe(doc)}"
            kind = doc.get("kind", "")
            counts[kind] = counts.get(kind, 0) + 1
            if doc.get("apiVersion") == "monitoring.coreos.com/v1":
                if kind not in monitoring_schemas:
                    monitoring_schemas[kind] = monitoring_schema(kind)
                for err in jsonschema.Draft202012Validator(monitoring_schemas[kind]).iter_errors(doc):
                    path_s = ".".join(str(p) for p in err.absolute_path) or "(root)"
                    problems.append(f"{name}: {path_s}: {err.message}")
                continue
            if doc.get("apiVersion", "").startswith("arrowport.dev/"):
                problems += [f"{name}: {e}" for e in crd_schemas.validate(doc)]
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kv.ValidationError as err:
                    path_s = ".".join(str(p) for p in err.path) or "(root)"
                    problems.append(f"{name}: Kubernetes {version}: {path_s}: {err.message}")
                except kv.SchemaNotFoundError as err:
                    problems.append(f"{name}: {err.message}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"  validated {sum(counts.values())} objects against Kubernetes {' and '.join(versions)} schemas: {summary}")
    return problems


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers") or []
    yield from pod_spec.get("containers") or []


def cmd_policy(files: list[Path]) -> list[str]:
    problems = []
    docs = [(path, doc) for path in files for doc in load_docs(path)]
    # Each file is one release: names are looked up in the same file.
    by_file: dict[Path, dict[tuple[str, str], Any]] = {}
    for path, d in docs:
        by_file.setdefault(path, {})[(d.get("kind"), d["metadata"]["name"])] = d
    workloads = 0
    for path, doc in docs:
        by_kind_name = by_file[path]
        name = f"{path}: {describe(doc)}"
        kind = doc.get("kind")
        if kind in ("Deployment", "StatefulSet"):
            workloads += 1
            pod = doc["spec"]["template"]["spec"]
            psc = pod.get("securityContext") or {}
            if psc.get("runAsNonRoot") is not True:
                problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
            if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{name}: pod seccompProfile is not RuntimeDefault")
            if pod.get("enableServiceLinks") is not False:
                problems.append(f"{name}: enableServiceLinks is not false (Service env vars would shadow ARROWPORT_*)")
            for c in containers(pod):
                sc = c.get("securityContext") or {}
                cname = f"{name} container {c['name']}"
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{cname}: readOnlyRootFilesystem is not true")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{cname}: allowPrivilegeEscalation is not false")
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    problems.append(f"{cname}: capabilities do not drop ALL")
                res = c.get("resources") or {}
                if not res.get("requests") or not res.get("limits"):
                    problems.append(f"{cname}: resource requests and limits are not both set")
                if not c.get("livenessProbe") or not c.get("readinessProbe"):
                    problems.append(f"{cname}: liveness and readiness probes are not both set")
        if kind == "StatefulSet":
            labels = doc["metadata"].get("labels") or {}
            ingester = labels.get("arrowport.dev/ingester")
            pod_labels = doc["spec"]["template"]["metadata"].get("labels") or {}
            if not ingester or pod_labels.get("arrowport.dev/ingester") != ingester:
                problems.append(f"{name}: StatefulSet and its pods must carry label arrowport.dev/ingester")
            pod = doc["spec"]["template"]["spec"]
            problems += storage_problems(name, doc, by_kind_name)
            if (pod.get("terminationGracePeriodSeconds") or 30) < 30:
                problems.append(f"{name}: terminationGracePeriodSeconds below 30 leaves no time to checkpoint")
            streams_cm = f"{ingester}-streams"
            cm = by_kind_name.get(("ConfigMap", streams_cm))
            if cm is None:
                problems.append(f"{name}: streams ConfigMap {streams_cm} is not rendered")
            else:
                if "data" in cm or "binaryData" in cm:
                    problems.append(f"ConfigMap {streams_cm}: must have no data (the operator owns data.streams.yaml)")
                if (cm["metadata"].get("labels") or {}).get("arrowport.dev/ingester") != ingester:
                    problems.append(f"ConfigMap {streams_cm}: label arrowport.dev/ingester is not {ingester}")
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            streams_volume = (volumes.get("streams") or {}).get("configMap") or {}
            if streams_volume.get("name") != streams_cm or streams_volume.get("optional") is not True:
                problems.append(f"{name}: volume 'streams' must mount ConfigMap {streams_cm} with optional: true")
            mounts = {m["mountPath"]: m for c in containers(pod) for m in c.get("volumeMounts") or []}
            for mount_path in ("/etc/arrowport/config.yaml", "/etc/arrowport/streams", "/var/lib/arrowport", "/tmp"):
                if mount_path not in mounts:
                    problems.append(f"{name}: nothing is mounted at {mount_path}")
            service = by_kind_name.get(("Service", doc["metadata"]["name"]))
            if service is None or not any(p.get("name") == "http" for p in service["spec"]["ports"]):
                problems.append(f"{name}: no Service of the same name with a port named http")
    if workloads == 0:
        problems.append("no Deployment or StatefulSet rendered")
    print(f"  checked {workloads} workloads for hardening, probes, resources and the operator contract")
    return problems


def storage_problems(name: str, sts: dict[str, Any], by_kind_name: dict[tuple[str, str], Any]) -> list[str]:
    """What the ingester's config.yaml says about its storage, against the StatefulSet that runs it."""
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    config_cm = by_kind_name.get(("ConfigMap", ((volumes.get("config") or {}).get("configMap") or {}).get("name")))
    if config_cm is None:
        return [f"{name}: its config ConfigMap is not rendered"]
    config = yaml.safe_load(config_cm["data"]["config.yaml"]) or {}
    storage = config.get("storage") or {"kind": "duckdb"}
    replicas = sts["spec"].get("replicas", 1)
    templates = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates") or []}
    mounts = [m for c in containers(pod) if c["name"] == "ingester" for m in c.get("volumeMounts") or []]
    env = {e["name"]: e for c in containers(pod) if c["name"] == "ingester" for e in c.get("env") or []}

    def volume_of(path: str) -> tuple[str, str] | None:
        """(kind, name) of the volume holding path: 'template' (one per pod) or 'claim' (one for all)."""
        candidates = [m for m in mounts if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        if not candidates:
            return None
        mount = max(candidates, key=lambda m: len(m["mountPath"]))
        if mount.get("readOnly") or mount.get("subPath"):
            return None
        if mount["name"] in templates:
            return ("template", mount["name"])
        claim = (volumes.get(mount["name"]) or {}).get("persistentVolumeClaim")
        return ("claim", claim["claimName"]) if claim else None

    problems = []
    if storage.get("kind") == "duckdb":
        if replicas > 1:
            problems.append(f"{name}: {replicas} replicas writing one DuckDB file (one writing process per file)")
        where = volume_of(str(config.get("db_path", "")))
        if where is None or where[0] != "template":
            problems.append(f"{name}: db_path {config.get('db_path')} is not on the pod's PersistentVolumeClaim")
        return problems
    catalog, data_path = str(storage.get("catalog", "")), str(storage.get("data_path", ""))
    postgres = catalog.startswith("postgres:")
    extensions = (config.get("duckdb") or {}).get("extension_directory")
    if extensions != IMAGE_EXTENSIONS:
        problems.append(f"{name}: duckdb.extension_directory is {extensions!r}, not the image's {IMAGE_EXTENSIONS}")
    data_volume = volume_of(data_path)
    if data_volume is None:
        problems.append(f"{name}: storage.data_path {data_path} is not on a writable PersistentVolumeClaim")
    if postgres:
        if "password" in catalog.lower():
            cm_name = config_cm["metadata"]["name"]
            problems.append(f"{name}: the catalog's connection string in ConfigMap {cm_name} holds a password")
        password = env.get("PGPASSWORD")
        if password is not None and "secretKeyRef" not in (password.get("valueFrom") or {}):
            problems.append(f"{name}: PGPASSWORD does not come from a Secret")
        if replicas > 1 and (data_volume is None or data_volume[0] != "claim"):
            problems.append(
                f"{name}: {replicas} replicas of one lake with storage.data_path {data_path} on per-pod volumes "
                "(each replica must read the others' Parquet files: a shared claim)"
            )
    else:
        if replicas > 1:
            problems.append(f"{name}: {replicas} replicas writing one local lake catalog file ({catalog})")
        if volume_of(catalog) is None:
            problems.append(f"{name}: the local catalog {catalog} is not on a writable PersistentVolumeClaim")
        if "PGPASSWORD" in env:
            problems.append(f"{name}: PGPASSWORD is set for a lake without a PostgreSQL catalog")
    return problems


def cmd_examples(crd: Path, files: list[Path]) -> list[str]:
    schemas = CrdSchemas([crd])
    if not schemas.by_gvk:
        return [f"{crd}: no CustomResourceDefinition with an openAPIV3Schema"]
    problems = []
    count = 0
    for path in files:
        for doc in load_docs(path):
            count += 1
            problems += [f"{path}: {describe(doc)}: {e}" for e in schemas.validate(doc)]
    print(f"  validated {count} example resources from {len(files)} files against {crd}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    k8s = sub.add_parser("k8s")
    k8s.add_argument("--crd", type=Path, action="append", default=[], help="CRD file for custom resources")
    k8s.add_argument("files", type=Path, nargs="+")
    policy = sub.add_parser("policy")
    policy.add_argument("files", type=Path, nargs="+")
    examples = sub.add_parser("examples")
    examples.add_argument("--crd", type=Path, required=True)
    examples.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()

    if args.command == "k8s":
        problems = cmd_k8s(args.files, args.crd)
    elif args.command == "policy":
        problems = cmd_policy(args.files)
    else:
        problems = cmd_examples(args.crd, args.files)
    for problem in problems:
        print(f"  FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
