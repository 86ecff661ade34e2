"""KServe's Python model server serving one ONNX model with onnxruntime: the baseline that
bench/server.py measures Partita's inference server against.

Runs only in a separate venv that has `kserve` (heavy, kept out of Partita's install);
bench/server.py creates that venv under ~/.cache/partita/bench/ and starts this script with it:

    ~/.cache/partita/bench/kserve-venv/bin/python bench/kserve_onnx_model.py \\
        --onnx M.onnx --name nsfw --port 8080 --threads 2

Stock KServe throughout (its ModelServer, FastAPI app, v2 REST decode and encode), with a
synchronous `predict` as in KServe's own custom-model examples; ORT gets the session options
Partita's servers use (intra-op threads as given, spinning off). Two deviations, both in
KServe's favour or neutral: gRPC and the per-request latency log line are off, and the REST
server is rebound from KServe's hard-coded 0.0.0.0 to 127.0.0.1 (this project listens on
loopback only).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kserve
import kserve.model_server
import numpy as np
import onnxruntime as ort
from kserve.protocol.rest.server import RESTServer
from kserve.utils.numpy_codec import from_np_dtype


class LoopbackRESTServer(RESTServer):
    """KServe's REST server, listening on 127.0.0.1 instead of every interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = "127.0.0.1"


class OnnxModel(kserve.Model):
    """One ONNX model in one onnxruntime session; inputs and outputs by the model's names."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        super().__init__(name)
        self._path = path
        self._threads = threads
        self._session: ort.InferenceSession | None = None

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # the session options Partita's servers use (see partita.runtime.Session)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(self._path), options, providers=["CPUExecutionProvider"]
        )
        self.ready = True
        return True

    def predict(
        self, payload: kserve.InferRequest, headers: dict[str, str] | None = None
    ) -> kserve.InferResponse:
        assert self._session is not None, "predict before load"
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        names = [o.name for o in self._session.get_outputs()]
        values: list[np.ndarray] = self._session.run(names, feeds)
        outputs = [
            kserve.InferOutput(
                name=name, shape=list(v.shape), datatype=from_np_dtype(v.dtype), data=v
            )
            for name, v in zip(names, values, strict=True)
        ]
        return kserve.InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the .onnx file to serve")
    parser.add_argument("--name", required=True, help="model name in /v2/models/{name}")
    parser.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    args, _ = parser.parse_known_args()
    kserve.model_server.RESTServer = LoopbackRESTServer
    model = OnnxModel(args.name, args.onnx, args.threads)
    model.load()
    server = kserve.ModelServer(
        http_port=args.port, enable_grpc=False, enable_latency_logging=False
    )
    server.start([model])


if __name__ == "__main__":
    main()
