"""The checked-in gRPC stubs are what grpc_tools.protoc writes from the .proto today, and the
service is the one v2 clients call (tritonclient.grpc's method paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

import partita_server.proto

PROTO_DIR = Path(partita_server.proto.__file__).parent
SRC = PROTO_DIR.parents[1]
GENERATED = ("open_inference_pb2.py", "open_inference_pb2.pyi")


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    code = protoc.main([
        "protoc", f"-I{SRC}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
        "partita_server/proto/open_inference.proto",
    ])  # fmt: skip
    assert code == 0
    for name in GENERATED:
        fresh = (tmp_path / "partita_server" / "proto" / name).read_text()
        if fresh != (PROTO_DIR / name).read_text():
            pytest.fail(f"partita_server/proto/{name} is stale: run `make protos`")


def test_service_paths_and_messages_are_the_ones_tritonclient_uses() -> None:
    """Method paths are on the wire, message names are not: the paths must be tritonclient's,
    and each message must read what tritonclient's same message writes."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from partita_server.grpc_codec import SERVICE
    from partita_server.grpc_service import OPERATIONS

    theirs = service_pb2_grpc.GRPCInferenceServiceStub.__init__.__code__.co_consts
    for name in OPERATIONS:
        assert f"/{SERVICE}/{name}" in theirs
    request = service_pb2.ModelInferRequest(model_name="m", model_version="2", id="r")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    tensor.parameters["binary_data_size"].int64_param = 8
    request.parameters["p"].string_param = "v"
    request.outputs.add(name="y")
    request.raw_input_contents.append(b"\0" * 8)
    ours = OPERATIONS["ModelInfer"][0].FromString(request.SerializeToString())
    assert (ours.model_name, ours.model_version, ours.id) == ("m", "2", "r")
    assert list(ours.inputs[0].shape) == [1, 2] and ours.inputs[0].datatype == "FP32"
    assert ours.inputs[0].parameters["binary_data_size"].int64_param == 8
    assert ours.parameters["p"].string_param == "v" and ours.outputs[0].name == "y"
    assert ours.raw_input_contents == [b"\0" * 8]
