#!/usr/bin/env python3
"""The chart's alerts and dashboard against the metrics Arrowport documents.

  monitoring.py rules RENDERED.yaml OUT.yaml
      Writes the PrometheusRule of a rendered chart as a Prometheus rules file (its spec.groups), for
      `promtool check rules` and `promtool test rules`: the rules promtool sees are the chart's, as rendered.

  monitoring.py check RENDERED.yaml DASHBOARD.json
      Fails unless
        - every metric name in the rules' expressions and the dashboard's queries is documented: the
          ingester's in README.md's metrics table (the `metrics-spec` one, which ingestor/tests checks
          against /metrics), the operator's in operator/README.md's metrics table, or one of EXTERNAL;
        - every alert has a summary, a description and a runbook_url whose anchor is a heading of
          helm/arrowport/README.md.
      So a renamed metric breaks CI, not the dashboard.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
# Metrics of other exporters the rules may use, with where they come from.
EXTERNAL = {
    "container_memory_working_set_bytes": "cAdvisor (the kubelet)",
    "kube_pod_container_resource_limits": "kube-state-metrics",
}
KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def documented_metrics() -> dict[str, str]:
    """Metric name -> type, from README.md's metrics-spec table and operator/README.md's metrics table."""
    names: dict[str, str] = {}
    readme = (ROOT / "README.md").read_text()
    spec = readme.split("<!-- metrics-spec", 1)[1].split("\n\n", 1)[0]
    for name, kind in re.findall(r"^\| `(arrowport_[a-z0-9_]+)` \| (\w+) \|", spec, re.M):
        names[name] = kind
    operator = (ROOT / "operator" / "README.md").read_text().split("### Metrics", 1)[1].split("\n### ", 1)[0]
    for name, kind in re.findall(r"^\| `(arrowport_operator_[a-z0-9_]+)(?:\{[^}]*\})?` \| (\w+) \|", operator, re.M):
        names[name] = kind
    if not any(n.startswith("arrowport_operator_") for n in names) or len(names) < 10:
        sys.exit("cannot find the metrics tables in README.md and operator/README.md")
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query with $variables) reads."""
    expr = re.sub(r"\blabel_values\(([^,]+),\s*\w+\)", r"\1", expr)  # Grafana: label_values(series, label)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)                     # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)                    # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\S+", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def prometheus_rules(rendered: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d and d.get("kind") == "PrometheusRule"]
    if len(docs) != 1:
        sys.exit(f"{rendered}: expected one PrometheusRule, found {len(docs)}")
    return docs[0]["spec"]["groups"]


def dashboard_queries(dashboard: Path) -> list[tuple[str, str]]:
    data = json.loads(dashboard.read_text())
    queries = [(p["title"], t["expr"]) for p in data["panels"] for t in p.get("targets", [])]
    queries += [(f"variable {v['name']}", v["query"]["query"]) for v in data["templating"]["list"]
                if v.get("type") == "query"]
    return queries


def check(rendered: Path, dashboard: Path) -> int:
    known = documented_metrics()
    problems = []
    used: dict[str, set[str]] = {}

    def lookup(name: str) -> bool:
        if name in known or name in EXTERNAL:
            return True
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        return base is not None and known.get(base) == "histogram"

    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", (ROOT / "helm/arrowport/README.md").read_text(), re.M)}
    alerts = 0
    for group in prometheus_rules(rendered):
        for rule in group["rules"]:
            where = f"alert {rule.get('alert') or rule.get('record')}"
            for name in metric_names(rule["expr"]):
                used.setdefault(name, set()).add(where)
            if "alert" in rule:
                alerts += 1
                notes = rule.get("annotations", {})
                for key in ("summary", "description", "runbook_url"):
                    if not notes.get(key):
                        problems.append(f"{where} has no {key}")
                anchor = notes.get("runbook_url", "").rpartition("#")[2]
                if anchor not in anchors:
                    problems.append(f"{where}: its runbook_url anchor #{anchor} is no heading of helm/arrowport/README.md")
    panels = dashboard_queries(dashboard)
    for title, expr in panels:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"dashboard: {title}")
    for name in sorted(used):
        if not lookup(name):
            problems.append(f"{name} is not a documented metric (used by {', '.join(sorted(used[name]))})")
    own = sorted(n for n in used if n not in EXTERNAL)
    print(f"  {alerts} alerts and {len(panels)} dashboard queries use {len(used)} metric names: "
          f"{len(own)} documented by Arrowport, {len(used) - len(own)} from "
          f"{', '.join(sorted(set(EXTERNAL[n] for n in used if n in EXTERNAL)))}", flush=True)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "rules":
        groups = prometheus_rules(Path(sys.argv[2]))
        Path(sys.argv[3]).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "check":
        return check(Path(sys.argv[2]), Path(sys.argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
