#!/usr/bin/env python3
"""Checks the vendored .proto files against the descriptors embedded in their wheels.

Compares every message, field (name, number, label, type, type name, oneof, proto3 optional,
packed and other options), enum value, reserved range/name, service, method (name, request and
response types, client/server streaming, options) and file option of the FileDescriptorSet that
`cargo build -p edge-proto` compiled from the vendored `tensorflow/` and `tensorflow_serving/`
files (`edge_proto::FILE_DESCRIPTOR_SET`, written to `$OUT_DIR/file_descriptor_set.bin`) with the
`*_pb2` descriptors of the `tensorflow` and `tensorflow-serving-api` wheels. (The KServe file is
checked by `check_kserve_against_triton.py`.)

Usage (TensorFlow installed in the venv, the unzipped tensorflow-serving-api wheel on
PYTHONPATH):

    PYTHONPATH=/path/to/unzipped/tensorflow_serving_api-wheel \
        <venv>/bin/python check_against_wheel.py path/to/file_descriptor_set.bin
"""

import importlib
import sys

from google.protobuf import descriptor_pb2


def normalise(fdp):
    fdp = descriptor_pb2.FileDescriptorProto.FromString(fdp.SerializeToString())
    fdp.ClearField("source_code_info")

    def clean_msg(m):
        for f in m.field:
            f.ClearField("json_name")
        # Declaration order is cosmetic; compare by number/name.
        fields = sorted(m.field, key=lambda f: f.number)
        del m.field[:]
        m.field.extend(fields)
        for n in m.nested_type:
            clean_msg(n)
        nested = sorted(m.nested_type, key=lambda n: n.name)
        del m.nested_type[:]
        m.nested_type.extend(nested)
        enums = sorted(m.enum_type, key=lambda e: e.name)
        del m.enum_type[:]
        m.enum_type.extend(enums)

    for m in fdp.message_type:
        clean_msg(m)
    return fdp


def main():
    fds = descriptor_pb2.FileDescriptorSet()
    with open(sys.argv[1], "rb") as f:
        fds.ParseFromString(f.read())
    checked = services = methods = 0
    for ours in fds.file:
        if not ours.name.startswith(("tensorflow/", "tensorflow_serving/")):
            continue  # google/protobuf/* come with protox; kserve/* are not from these wheels
        module = importlib.import_module(ours.name[: -len(".proto")].replace("/", ".") + "_pb2")
        theirs = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(theirs)
        a, b = normalise(ours), normalise(theirs)
        if a != b:
            print(f"MISMATCH {ours.name}\n--- vendored\n{a}\n--- wheel\n{b}")
            sys.exit(1)
        checked += 1
        services += len(ours.service)
        methods += sum(len(s.method) for s in ours.service)
    print(
        f"{checked} vendored files ({services} services, {methods} methods) match the wheels' "
        "descriptors"
    )


if __name__ == "__main__":
    main()
