#!/usr/bin/env python3
"""Validates rendered manifests' custom resources against their CRDs' schemas (check.sh, step 2).

kubernetes-validate knows only the built-in kinds and merely warns about the others ("Couldn't
find schema"), so the Gateway API objects of the overlays (Gateway, GRPCRoute) are checked
here against the `openAPIV3Schema` of the CustomResourceDefinitions in --crds (the Gateway
API's standard-channel CRDs, ../shared/k8s-crds/gateway-api-v1.6.1), the served version the
object names. Strict as `kubernetes-validate --strict` is: every object schema that lists its
properties (and neither preserves unknown fields nor declares additionalProperties) rejects
unknown fields, which the API server would silently prune. metadata.name is checked as a DNS
subdomain, as the API server does for custom resources.

Not evaluated: the CRDs' CEL rules (`x-kubernetes-validations`, the API server runs them with
Kubernetes' CEL libraries); their number on the paths used is printed.

Usage: crd_validate.py --crds DIR --builtin-out OUT.yaml RENDERED.yaml
  Writes the documents of built-in kinds (everything whose API group no CRD defines) to
  OUT.yaml for kubernetes-validate; exits 1 on the first file with an invalid custom resource
  or a custom resource of an unknown kind or version.
"""

import argparse
import copy
import pathlib
import re
import sys

import jsonschema
import yaml

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# API groups of the built-in kinds (core is ""); everything else must have a CRD in --crds.
BUILTIN_GROUPS = {"", "apps", "batch", "autoscaling", "policy"}
BUILTIN_SUFFIX = ".k8s.io"


def strict(schema):
    """A copy of `schema` where objects with listed properties refuse unknown fields."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def load_crds(directory):
    """{(group, version, kind): (validator, CEL rule count)} for every served version."""
    crds = {}
    files = sorted(pathlib.Path(directory).glob("*.yaml"))
    if not files:
        sys.exit(f"crd_validate.py: no CRD files in {directory}")
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                if not v.get("served"):
                    continue
                schema = strict(v["schema"]["openAPIV3Schema"])
                validator = jsonschema.Draft7Validator(schema)
                rules = yaml.safe_dump(v["schema"]["openAPIV3Schema"]).count("rule:")
                crds[(spec["group"], v["name"], spec["names"]["kind"])] = (validator, rules, path.name)
    return crds


def cel_rules_on(schema_node, obj):
    """CEL rules on the schema paths `obj` actually uses."""
    n = 0
    if not isinstance(schema_node, dict):
        return 0
    n += len(schema_node.get("x-kubernetes-validations", []))
    if isinstance(obj, dict):
        props = schema_node.get("properties", {})
        for k, v in obj.items():
            if k in props:
                n += cel_rules_on(props[k], v)
    elif isinstance(obj, list) and "items" in schema_node:
        for v in obj:
            n += cel_rules_on(schema_node["items"], v)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crds", required=True)
    ap.add_argument("--builtin-out", required=True)
    ap.add_argument("rendered")
    args = ap.parse_args()

    crds = load_crds(args.crds)
    groups = {g for (g, _, _) in crds}
    docs = [d for d in yaml.safe_load_all(pathlib.Path(args.rendered).read_text()) if d]
    builtin, errors, checked = [], [], []
    cel = 0
    for d in docs:
        api = d.get("apiVersion", "")
        group, _, version = api.rpartition("/")
        kind = d.get("kind", "")
        name = (d.get("metadata") or {}).get("name", "")
        what = f"{kind} {name} ({api})"
        if group not in groups:
            if group in BUILTIN_GROUPS or group.endswith(BUILTIN_SUFFIX):
                builtin.append(d)
            else:
                errors.append(f"{what}: not a built-in kind and no CRD in {args.crds} defines it")
            continue
        entry = crds.get((group, version, kind))
        if entry is None:
            known = sorted(f"{g}/{v} {k}" for (g, v, k) in crds if g == group)
            errors.append(f"{what}: no served CRD version for it (known: {', '.join(known)})")
            continue
        validator, _, crd_file = entry
        if not name or len(name) > 253 or not DNS_SUBDOMAIN.match(name):
            errors.append(f"{what}: metadata.name must be a DNS subdomain")
        found = sorted(validator.iter_errors(d), key=lambda e: list(e.absolute_path))
        for e in found:
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            errors.append(f"{what}: {path}: {e.message}")
        if not found:
            checked.append(f"{kind} {name} against {crd_file} {version}")
            cel += cel_rules_on(validator.schema, d)

    with open(args.builtin_out, "w") as f:
        yaml.safe_dump_all(builtin, f, sort_keys=False)
    for c in checked:
        print(f"  valid (strict): {c}")
    if checked:
        print(f"  ({cel} CEL rules on the paths used, not evaluated: the API server runs them)")
    for e in errors:
        print(f"  INVALID {e}")
    print(f"{len(checked)} custom resources valid, {len(errors)} errors, {len(builtin)} built-in objects left for kubernetes-validate")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
