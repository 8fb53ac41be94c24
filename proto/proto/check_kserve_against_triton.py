#!/usr/bin/env python3
"""Checks kserve/grpc_predict_v2.proto against Triton's descriptor of the same `inference` package.

Triton's `grpc_service.proto` (embedded, serialized, in `tritonclient/grpc/service_pb2.py` of the
tritonclient wheel) is a superset of the KServe v2 / Open Inference Protocol gRPC API: same
package, service, messages and field numbers, plus Triton's extensions. This script takes the
descriptor that `cargo build -p edge-proto` compiled from the vendored file
(`edge_proto::FILE_DESCRIPTOR_SET`, written to `$OUT_DIR/file_descriptor_set.bin`) and checks that

- the package is Triton's and every service we declare exists in Triton's file;
- every method we declare exists in Triton's service with the same request and response types
  and the same client/server streaming flags;
- every message we declare (nested ones and map entries included) exists in Triton's file under
  the same full name, and each of its fields has the same number, label, type, type name, oneof
  (by name), proto3 `optional` and options; map entries are map entries in both; our enums (if
  any) have the same values.

Fields, messages and methods Triton has beyond ours are listed (for information), not errors.

Usage (tritonclient is not installed: its unzipped wheel is put on PYTHONPATH; only its
generated protobuf modules are loaded, so grpcio and its other dependencies are not needed):

    PYTHONPATH=/path/to/unzipped/tritonclient-wheel \\
        <venv>/bin/python check_kserve_against_triton.py path/to/file_descriptor_set.bin
"""

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

from google.protobuf import descriptor_pb2

OURS = "kserve/grpc_predict_v2.proto"


def load_triton():
    """Triton's FileDescriptorProto, without running tritonclient/grpc/__init__.py (which needs
    grpcio, rapidjson, ...): stub packages whose __path__ points into the wheel."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tritonclient not found: put the unzipped wheel on PYTHONPATH")
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("tritonclient", root), ("tritonclient.grpc", os.path.join(root, "grpc"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg
    module = importlib.import_module("tritonclient.grpc.service_pb2")
    fdp = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fdp)
    return fdp


def messages(fdp):
    """Full name -> DescriptorProto, nested messages included."""
    out = {}

    def walk(prefix, msgs):
        for m in msgs:
            name = f"{prefix}.{m.name}"
            out[name] = m
            walk(name, m.nested_type)

    walk(f".{fdp.package}", fdp.message_type)
    return out


def enums(fdp):
    out = {}

    def walk(prefix, msgs, es):
        for e in es:
            out[f"{prefix}.{e.name}"] = e
        for m in msgs:
            walk(f"{prefix}.{m.name}", m.nested_type, m.enum_type)

    walk(f".{fdp.package}", fdp.message_type, fdp.enum_type)
    return out


def field_key(msg, f):
    oneof = None
    if f.HasField("oneof_index"):
        oneof = msg.oneof_decl[f.oneof_index].name
    return {
        "number": f.number,
        "label": descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
        "type": descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
        "type_name": f.type_name,
        "oneof": oneof,
        "proto3_optional": f.proto3_optional,
        "options": f.options.SerializeToString(deterministic=True),
    }


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    fds = descriptor_pb2.FileDescriptorSet()
    with open(sys.argv[1], "rb") as f:
        fds.ParseFromString(f.read())
    ours = next((f for f in fds.file if f.name == OURS), None)
    if ours is None:
        raise SystemExit(f"{OURS} is not in {sys.argv[1]}")
    theirs = load_triton()
    errors, extra = [], []

    if ours.package != theirs.package:
        errors.append(f"package {ours.package!r} != Triton's {theirs.package!r}")
    if list(ours.dependency):
        errors.append(f"unexpected imports {list(ours.dependency)}")

    # Services and methods.
    their_services = {s.name: s for s in theirs.service}
    n_methods = 0
    for s in ours.service:
        ts = their_services.get(s.name)
        if ts is None:
            errors.append(f"service {s.name} not in Triton's file")
            continue
        their_methods = {m.name: m for m in ts.method}
        for m in s.method:
            n_methods += 1
            tm = their_methods.get(m.name)
            if tm is None:
                errors.append(f"method {s.name}.{m.name} not in Triton's service")
                continue
            for attr in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(m, attr) != getattr(tm, attr):
                    errors.append(
                        f"{s.name}.{m.name}: {attr} {getattr(m, attr)!r} != Triton's "
                        f"{getattr(tm, attr)!r}"
                    )
        ours_m = {m.name for m in s.method}
        extra += [f"method {s.name}.{m.name}" for m in ts.method if m.name not in ours_m]

    # Messages and fields.
    our_msgs, their_msgs = messages(ours), messages(theirs)
    n_fields = 0
    for name, m in our_msgs.items():
        tm = their_msgs.get(name)
        if tm is None:
            errors.append(f"message {name} not in Triton's file")
            continue
        if m.options.map_entry != tm.options.map_entry:
            errors.append(f"{name}: map_entry {m.options.map_entry} != {tm.options.map_entry}")
        their_fields = {f.name: f for f in tm.field}
        for f in m.field:
            n_fields += 1
            tf = their_fields.get(f.name)
            if tf is None:
                errors.append(f"field {name}.{f.name} not in Triton's message")
                continue
            a, b = field_key(m, f), field_key(tm, tf)
            for k in a:
                if a[k] != b[k]:
                    errors.append(f"{name}.{f.name}: {k} {a[k]!r} != Triton's {b[k]!r}")
        ours_f = {f.name for f in m.field}
        extra += [f"field {name}.{f.name} = {f.number}" for f in tm.field if f.name not in ours_f]
    extra += [f"message {n}" for n in their_msgs if n not in our_msgs]

    # Enums (the KServe file has none; kept for completeness).
    their_enums = enums(theirs)
    for name, e in enums(ours).items():
        te = their_enums.get(name)
        if te is None:
            errors.append(f"enum {name} not in Triton's file")
            continue
        tv = {v.name: v.number for v in te.value}
        for v in e.value:
            if tv.get(v.name) != v.number:
                errors.append(f"{name}.{v.name} = {v.number}: Triton has {tv.get(v.name)}")

    try:
        version = importlib.metadata.version("tritonclient")
    except importlib.metadata.PackageNotFoundError:
        version = "(unknown version)"
    print(f"Triton descriptor: {theirs.name} (package {theirs.package}), tritonclient {version}")
    print(
        f"Triton has beyond {OURS}: {sum(e.startswith('method') for e in extra)} methods, "
        f"{sum(e.startswith('message') for e in extra)} messages, "
        f"{sum(e.startswith('field') for e in extra)} fields of shared messages:"
    )
    for e in extra:
        if not e.startswith("message"):
            print(f"  {e}")
    if errors:
        print(f"{len(errors)} MISMATCHES:")
        for e in errors:
            print(f"  {e}")
        sys.exit(1)
    print(
        f"OK: {OURS}: {len(ours.service)} service, {n_methods} methods, {len(our_msgs)} messages "
        f"(nested and map entries included), {n_fields} fields match Triton's descriptor"
    )


if __name__ == "__main__":
    main()
