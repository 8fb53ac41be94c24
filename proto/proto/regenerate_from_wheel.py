#!/usr/bin/env python3
"""Regenerates the vendored TensorFlow and TensorFlow Serving .proto files from their wheels.

The `tensorflow` and `tensorflow-serving-api` pip wheels ship no .proto sources, but every
generated `*_pb2.py` module embeds the exact serialized FileDescriptorProto it was compiled from.
This script prints those descriptors back as .proto source (same paths, packages, messages,
field numbers, services, methods, options; comments are not kept by protoc in the descriptors,
so there are none); `check_against_wheel.py` checks the result round-trips: see README.md.

Usage (TensorFlow installed in the venv, the unzipped tensorflow-serving-api wheel on
PYTHONPATH):

    PYTHONPATH=/path/to/unzipped/tensorflow_serving_api-wheel \
        <venv>/bin/python regenerate_from_wheel.py [OUT_DIR]   (default: this directory)
"""

import importlib
import importlib.metadata
import os
import sys

from google.protobuf import descriptor_pb2

# The files edge-proto needs; their imports are followed automatically.
ROOTS = [
    "tensorflow/core/framework/graph.proto",
    "tensorflow/core/framework/node_def.proto",
    "tensorflow/core/framework/function.proto",
    "tensorflow/core/framework/attr_value.proto",
    "tensorflow/core/framework/tensor.proto",
    "tensorflow/core/framework/tensor_shape.proto",
    "tensorflow/core/framework/types.proto",
    "tensorflow/core/framework/resource_handle.proto",
    "tensorflow/core/framework/full_type.proto",
    "tensorflow/core/framework/op_def.proto",
    "tensorflow/core/framework/versions.proto",
    "tensorflow/core/framework/variable.proto",
    "tensorflow/core/framework/tensor_slice.proto",
    "tensorflow/core/protobuf/meta_graph.proto",
    "tensorflow/core/protobuf/saved_model.proto",
    "tensorflow/core/protobuf/saved_object_graph.proto",
    "tensorflow/core/protobuf/trackable_object_graph.proto",
    "tensorflow/core/protobuf/struct.proto",
    "tensorflow/core/protobuf/saver.proto",
    "tensorflow/core/protobuf/tensor_bundle.proto",
    # TensorFlow Serving's gRPC API (package tensorflow.serving), from tensorflow-serving-api;
    # its imports bring predict, model, get_model_metadata, classification, regression,
    # inference, input and tensorflow/core/example/{example,feature}.proto.
    "tensorflow_serving/apis/prediction_service.proto",
]

SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}
F = descriptor_pb2.FieldDescriptorProto


def load(name):
    module = importlib.import_module(name[: -len(".proto")].replace("/", ".") + "_pb2")
    fdp = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fdp)
    return fdp


def quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def file_options(opts):
    out = []
    for field, value in opts.ListFields():
        if field.type == field.TYPE_STRING:
            out.append(f"option {field.name} = {quote(value)};")
        elif field.type == field.TYPE_BOOL:
            out.append(f"option {field.name} = {'true' if value else 'false'};")
        elif field.type == field.TYPE_ENUM:
            out.append(f"option {field.name} = {field.enum_type.values_by_number[value].name};")
        else:
            raise SystemExit(f"unsupported file option {field.name}")
    return out


def field_options(field):
    opts = []
    for f, value in field.options.ListFields():
        if f.name in ("packed", "deprecated", "lazy"):
            opts.append(f"{f.name} = {'true' if value else 'false'}")
        elif f.name in ("jstype", "ctype"):
            opts.append(f"{f.name} = {f.enum_type.values_by_number[value].name}")
        else:
            raise SystemExit(f"unsupported field option {f.name} on {field.name}")
    if field.HasField("json_name") and field.json_name != default_json_name(field.name):
        opts.append(f"json_name = {quote(field.json_name)}")
    if field.HasField("default_value"):
        raise SystemExit(f"proto2 default on {field.name} not supported")
    return f" [{', '.join(opts)}]" if opts else ""


def default_json_name(name):
    parts = name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def type_name(field):
    if field.type in (F.TYPE_MESSAGE, F.TYPE_ENUM):
        return field.type_name  # fully qualified, leading dot: unambiguous
    return SCALARS[field.type]


def reserved(desc, ind):
    out = []
    if desc.reserved_range:
        ranges = []
        for r in desc.reserved_range:
            # Message ranges are end-exclusive, enum ranges end-inclusive.
            end = r.end - 1 if isinstance(desc, descriptor_pb2.DescriptorProto) else r.end
            ranges.append(str(r.start) if end == r.start else f"{r.start} to {end}")
        out.append(f"{ind}reserved {', '.join(ranges)};")
    if desc.reserved_name:
        out.append(f"{ind}reserved {', '.join(quote(n) for n in desc.reserved_name)};")
    return out


def enum(e, ind):
    out = [f"{ind}enum {e.name} {{"]
    if e.options.allow_alias:
        out.append(f"{ind}  option allow_alias = true;")
    for v in e.value:
        opt = " [deprecated = true]" if v.options.deprecated else ""
        out.append(f"{ind}  {v.name} = {v.number}{opt};")
    out += reserved(e, ind + "  ")
    out.append(f"{ind}}}")
    return out


def message(m, ind, syntax):
    out = [f"{ind}message {m.name} {{"]
    inner = ind + "  "
    if m.options.deprecated:
        out.append(f"{inner}option deprecated = true;")
    maps = {n.name: n for n in m.nested_type if n.options.map_entry}
    for n in m.nested_type:
        if not n.options.map_entry:
            out += message(n, inner, syntax)
    for e in m.enum_type:
        out += enum(e, inner)
    oneofs = {}
    for field in m.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            oneofs.setdefault(field.oneof_index, []).append(field)
    done_oneofs = set()
    for field in m.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            idx = field.oneof_index
            if idx in done_oneofs:
                continue
            done_oneofs.add(idx)
            out.append(f"{inner}oneof {m.oneof_decl[idx].name} {{")
            for of in oneofs[idx]:
                out.append(f"{inner}  {type_name(of)} {of.name} = {of.number}{field_options(of)};")
            out.append(f"{inner}}}")
            continue
        entry_name = field.type_name.rsplit(".", 1)[-1]
        if field.label == F.LABEL_REPEATED and field.type == F.TYPE_MESSAGE and entry_name in maps:
            entry = maps[entry_name]
            k, v = entry.field[0], entry.field[1]
            decl = f"map<{type_name(k)}, {type_name(v)}>"
        else:
            decl = type_name(field)
            if field.label == F.LABEL_REPEATED:
                decl = "repeated " + decl
            elif field.proto3_optional:
                decl = "optional " + decl
            elif syntax == "proto2":
                decl = ("required " if field.label == F.LABEL_REQUIRED else "optional ") + decl
        out.append(f"{inner}{decl} {field.name} = {field.number}{field_options(field)};")
    if m.extension_range or m.extension:
        raise SystemExit(f"extensions in {m.name} not supported")
    out += reserved(m, inner)
    out.append(f"{ind}}}")
    return out


def service(s):
    if s.options.ListFields():
        raise SystemExit(f"options on service {s.name} not supported")
    out = [f"service {s.name} {{"]
    for m in s.method:
        if m.options.ListFields():
            raise SystemExit(f"options on method {s.name}.{m.name} not supported")
        req = ("stream " if m.client_streaming else "") + m.input_type
        resp = ("stream " if m.server_streaming else "") + m.output_type
        out.append(f"  rpc {m.name}({req}) returns ({resp});")
    out.append("}")
    return out


def wheel_of(name):
    """The wheel (distribution name and version) a vendored file's descriptor comes from."""
    dist = "tensorflow-serving-api" if name.startswith("tensorflow_serving/") else "tensorflow"
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        import tensorflow as tf  # tensorflow_cpu and friends install as module `tensorflow`

        return f"{dist} {tf.__version__}"


def render(fdp, wheel):
    syntax = fdp.syntax or "proto2"
    out = [
        f"// Generated from the serialized descriptor of {fdp.name}",
        f"// embedded in the {wheel} wheel; see README.md. Do not edit.",
        "",
        f'syntax = "{syntax}";',
        "",
        f"package {fdp.package};",
        "",
    ]
    public = set(fdp.public_dependency)
    for i, dep in enumerate(fdp.dependency):
        out.append(f"import {'public ' if i in public else ''}{quote(dep)};")
    if fdp.dependency:
        out.append("")
    out += file_options(fdp.options)
    for e in fdp.enum_type:
        out.append("")
        out += enum(e, "")
    for m in fdp.message_type:
        out.append("")
        out += message(m, "", syntax)
    for svc in fdp.service:
        out.append("")
        out += service(svc)
    if fdp.extension:
        raise SystemExit(f"extensions in {fdp.name} not supported")
    return "\n".join(out) + "\n"


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    todo, seen = list(ROOTS), set()
    while todo:
        name = todo.pop()
        if name in seen or name.startswith("google/protobuf/"):
            continue
        seen.add(name)
        fdp = load(name)
        todo += list(fdp.dependency)
        path = os.path.join(out_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(render(fdp, wheel_of(name)))
    print(f"wrote {len(seen)} files under {out_dir}")


if __name__ == "__main__":
    main()
