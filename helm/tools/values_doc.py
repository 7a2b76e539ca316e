#!/usr/bin/env python3
"""The values reference in helm/arrowport/README.md, generated from values.yaml and values.schema.json.

values.yaml documents keys with `# -- text` comments (continued by further `#` lines) right above them; a
comment on a map documents everything below it. This script
  - fails if a key of values.yaml has no documentation (its own or a documented parent's),
  - fails if a documented key is not in values.schema.json,
  - renders one table row per documented key (type from the schema, default from values.yaml) between
    the README's `<!-- values:begin -->` and `<!-- values:end -->` markers.

  values_doc.py check   exit 1 if the README's table is not what values.yaml and the schema give
  values_doc.py update  rewrite the table in the README
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "arrowport"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(\s|$)")


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) in file order."""
    stack: list[tuple[int, str]] = []
    doc: list[str] | None = None
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            doc = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if doc is not None:
                doc.append(stripped[1:].strip())
            continue
        m = KEY.match(line)
        if not m:
            if stripped and not stripped.startswith("-"):
                doc = None
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = ".".join(k for _, k in stack)
        if doc is not None:
            out.append((path, " ".join(doc)))
            doc = None
    return out


def leaves(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in leaves(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def lookup(value: Any, path: str) -> Any:
    for part in path.split("."):
        value = value[part]
    return value


def schema_at(schema: dict[str, Any], root: dict[str, Any], path: str) -> dict[str, Any] | None:
    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = lookup(root, node["$ref"].removeprefix("#/").replace("/", "."))
        return node

    node = resolve(schema)
    for part in path.split("."):
        props = node.get("properties") or {}
        if part not in props:
            return None
        node = resolve(props[part])
    return node


def type_of(node: dict[str, Any]) -> str:
    if "type" in node:
        t = node["type"]
        return " or ".join(t) if isinstance(t, list) else t
    for key in ("oneOf", "anyOf"):
        if key in node:
            return " or ".join(dict.fromkeys(type_of(n) for n in node[key]))
    return "any"


def render() -> tuple[str, list[str]]:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    docs = documented_keys(text)
    problems = []
    documented = {path for path, _ in docs}
    for leaf in leaves(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            problems.append(f"values.yaml: {leaf} has no `# --` documentation (its own or a parent's)")
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for path, description in docs:
        node = schema_at(schema, schema, path)
        if node is None:
            problems.append(f"values.schema.json: {path} is documented in values.yaml but not in the schema")
            continue
        default = json.dumps(lookup(values, path), separators=(", ", ": "))
        description = description.replace("|", "\\|")
        rows.append(f"| `{path}` | {type_of(node)} | `{default}` | {description} |")
    return "\n".join(rows), problems


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    table, problems = render()
    readme_path = CHART / "README.md"
    shown = "helm/arrowport/README.md"
    readme = readme_path.read_text()
    if BEGIN not in readme or END not in readme:
        problems.append(f"{shown}: markers {BEGIN} / {END} are missing")
    else:
        head, rest = readme.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        wanted = f"{head}{BEGIN}\n{table}\n{END}{tail}"
        if mode == "update":
            readme_path.write_text(wanted)
            print(f"  wrote the values table ({table.count(chr(10)) - 1} keys) into {shown}")
        elif wanted != readme:
            problems.append(f"{shown}: the values table is out of date (run helm/tools/values_doc.py update)")
        else:
            print(f"  values table in README.md is current ({table.count(chr(10)) - 1} keys, each in the schema)")
    for problem in problems:
        print(f"  FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
