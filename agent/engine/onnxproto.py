"""Read the tree node of an ONNX file without the `onnx` package.

A device only needs four message types to see a tree ensemble's attributes; declaring
that subset to protobuf (already installed for onnxruntime) saves the `onnx` package on
the device (31 MB on disk, 11 MB resident). Field numbers follow onnx/onnx.proto;
protobuf skips every field we do not declare.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

_F = descriptor_pb2.FieldDescriptorProto
_ONE, _MANY = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# message -> (field name, number, type, label, message type or "")
_SUBSET: dict[str, list[tuple[str, int, int, int, str]]] = {
    "AttributeProto": [
        ("name", 1, _F.TYPE_BYTES, _ONE, ""),
        ("f", 2, _F.TYPE_FLOAT, _ONE, ""),
        ("i", 3, _F.TYPE_INT64, _ONE, ""),
        ("s", 4, _F.TYPE_BYTES, _ONE, ""),
        ("floats", 7, _F.TYPE_FLOAT, _MANY, ""),
        ("ints", 8, _F.TYPE_INT64, _MANY, ""),
        ("strings", 9, _F.TYPE_BYTES, _MANY, ""),
    ],
    "NodeProto": [
        ("op_type", 4, _F.TYPE_BYTES, _ONE, ""),
        ("attribute", 5, _F.TYPE_MESSAGE, _MANY, "AttributeProto"),
        ("domain", 7, _F.TYPE_BYTES, _ONE, ""),
    ],
    "GraphProto": [("node", 1, _F.TYPE_MESSAGE, _MANY, "NodeProto")],
    "ModelProto": [
        ("ir_version", 1, _F.TYPE_INT64, _ONE, ""),
        ("graph", 7, _F.TYPE_MESSAGE, _ONE, "GraphProto"),
    ],
}
_PACKAGE = "corrosion_edge.onnx_subset"


def _model_class() -> type[Message]:
    file = descriptor_pb2.FileDescriptorProto(
        name="corrosion_edge_onnx_subset.proto", package=_PACKAGE, syntax="proto2"
    )
    for name, fields in _SUBSET.items():
        message = file.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            message.field.add(
                name=field,
                number=number,
                type=kind,
                label=label,
                type_name=f".{_PACKAGE}.{type_name}" if type_name else None,
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))


_ModelProto = _model_class()

Attribute = list[int] | list[float] | list[str] | str | int | float


def parse_nodes(data: bytes) -> list[tuple[str, dict[str, Attribute]]]:
    """(op_type, attributes) of every graph node; ValueError when this is not ONNX."""
    model: Any = _ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"protobuf decode failed ({exc})") from exc
    if not model.HasField("graph") or not model.ir_version:
        raise ValueError("no ONNX graph in the file")
    nodes = []
    for node in model.graph.node:
        attrs: dict[str, Attribute] = {}
        for a in node.attribute:
            name = a.name.decode()
            if a.strings:
                attrs[name] = [s.decode() for s in a.strings]
            elif a.ints:
                attrs[name] = list(a.ints)
            elif a.floats:
                attrs[name] = list(a.floats)
            elif a.HasField("s"):
                attrs[name] = a.s.decode()
            elif a.HasField("i"):
                attrs[name] = int(a.i)
            elif a.HasField("f"):
                attrs[name] = float(a.f)
        nodes.append((node.op_type.decode(errors="replace"), attrs))
    return nodes
