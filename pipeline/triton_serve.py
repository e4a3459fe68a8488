"""A Segmenter whose network runs on a Triton server (TritonBackend, open_segmenter), and `serve`: one ONNX model of a
repository (pipeline.triton.write_repository) served through PyTriton's bundled tritonserver.

`python -m pipeline.triton_serve serve REPO --model NAME`: PyTriton ships tritonserver with its Python backend only,
so ONNX Runtime on the CPU stands in for Triton's onnxruntime backend there, bound with the config.pbtxt's tensors,
max_batch_size and dynamic batcher. The module imports nothing heavier than numpy at load: the server runs in a venv
with numpy<2, onnxruntime and PyTriton, without torch or OpenCV.
"""

from __future__ import annotations

import json
import os
import signal
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.artifacts import Metadata, read_sidecar
from pipeline.errors import InputError
from pipeline.triton import CONTRACT_TENSORS, NUMPY_TYPES, TRITON_DIR, TYPES, VERSION, schema, validate_config

if TYPE_CHECKING:
    from pipeline.infer import Segmenter


class TritonBackend:
    """A model on a Triton server as a Segmenter backend (pipeline.infer.Backend) over gRPC: `run` sends one prepared
    batch (split at the server's max_batch_size) and returns the output."""

    name = "triton"

    def __init__(self, url: str, model: str, meta: Metadata, timeout_s: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.url, self.model, self.meta, self.timeout_s = url, model, meta, timeout_s
        self.device = f"triton grpc://{url}"
        self._grpc, self._error = grpcclient, InferenceServerException
        self.client = grpcclient.InferenceServerClient(url)
        config = self._call(lambda: self.client.get_model_config(model, client_timeout=timeout_s)).config
        self.max_batch = config.max_batch_size  # 0: a static batch, which the Segmenter pads to
        if len(config.input) != 1 or not config.output:
            raise InputError(f"triton {url} model {model!r}: {len(config.input)} inputs and {len(config.output)} "
                             "outputs; a segmentation network has one input and its output")
        self.input, self.outputs = config.input[0], [o.name for o in config.output]
        c = meta.contract
        want = (c.input_name, TYPES[CONTRACT_TENSORS[c.input][0]])
        got = (self.input.name, schema().DataType.Name(self.input.data_type))
        if got != want:
            raise InputError(f"triton {url} model {model!r}: takes {got[0]!r} {got[1]}, but the record's contract is "
                             f"{want[0]!r} {want[1]} (another model's record?)")
        self.datatype = got[1].removeprefix("TYPE_")  # tritonclient's name: FP32, UINT8

    def _call(self, fn):
        try:
            return fn()
        except self._error as e:
            text = (e.message() or str(e)).strip().splitlines()[0]
            raise InputError(f"triton {self.url} model {self.model!r}: {text}") from None

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        step = self.max_batch or len(x)
        parts = [self._infer(x[i:i + step]) for i in range(0, len(x), step)]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.outputs}

    def _infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        g = self._grpc
        inp = g.InferInput(self.input.name, list(x.shape), self.datatype)
        inp.set_data_from_numpy(np.ascontiguousarray(x))
        wanted = [g.InferRequestedOutput(name) for name in self.outputs]
        result = self._call(lambda: self.client.infer(self.model, [inp], outputs=wanted, client_timeout=self.timeout_s))
        return {name: result.as_numpy(name) for name in self.outputs}

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.infer(x)[self.outputs[0]]

    def sync(self) -> None:
        pass  # infer returns when the outputs are in host memory


def read_record(source: str | os.PathLike, model: str) -> tuple[Metadata, Path]:
    """The record of `model`: from a repository (write_repository's `out`, or its triton/ folder: the model's
    1/model.*.json), a record JSON file, or an artifact with its sidecar."""
    source = Path(source)
    if source.is_dir():
        for root in (source / TRITON_DIR, source):
            records = sorted((root / model / VERSION).glob("model.*.json"))
            if records:
                return read_sidecar(records[0].with_suffix("")), records[0].with_suffix("")
        raise InputError(f"{source}: no model {model!r} with its record (triton/{model}/{VERSION}/model.*.json)")
    if source.suffix == ".json":
        try:
            data = json.loads(source.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{source}: unreadable record ({str(e).splitlines()[0]})") from None
        return Metadata.from_dict(data, str(source)), source
    return read_sidecar(source), source


def open_segmenter(url: str, model: str, repository_or_record: str | os.PathLike, *,
                   size: tuple[int, int] | None = None, timeout_s: float = 60.0) -> Segmenter:
    """A Segmenter whose network runs on Triton (`url` host:port of its gRPC endpoint), with the pre- and
    post-processing its record describes (read_record)."""
    from pipeline.infer import Segmenter

    meta, path = read_record(repository_or_record, model)
    return Segmenter(TritonBackend(url, model, meta, timeout_s), meta, path, size)


# ------------------------------------------------------------------------------------------------ the server
def serve(repository: str | os.PathLike, model: str, *, http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, threads: int = 0) -> None:
    """Serve one ONNX model of a repository through PyTriton's tritonserver, bound with the config.pbtxt's input
    and output names, data types, dims, max_batch_size and dynamic batcher, the graph run by ONNX Runtime on the
    CPU: Triton's onnxruntime backend emulated in its Python backend (PyTriton ships no other). Blocks until
    SIGINT or SIGTERM, then stops tritonserver (PyTriton's serve ends on KeyboardInterrupt)."""
    folder = next((f for f in (Path(repository) / model, Path(repository) / TRITON_DIR / model)
                   if (f / "config.pbtxt").is_file()), None)
    if folder is None:
        raise InputError(f"{repository}: no model {model!r} (<repository>/[triton/]{model}/config.pbtxt)")
    config = validate_config((folder / "config.pbtxt").read_text(), str(folder / "config.pbtxt"))
    if config.platform != "onnxruntime_onnx":
        raise InputError(f"{folder}: platform {config.platform!r}; only an ONNX model can be emulated here")
    import onnxruntime as ort
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    # a session of its own, not pipeline.infer.ort_session: this stands in for Triton's backend, in a venv that has
    # ONNX Runtime but not the pipeline's other dependencies (OpenCV)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / VERSION / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    pb = schema()

    def tensors(items) -> list:
        return [Tensor(name=t.name, dtype=np.dtype(NUMPY_TYPES[pb.DataType.Name(t.data_type)]), shape=tuple(t.dims))
                for t in items]

    batching = config.max_batch_size > 0
    batcher = DynamicBatcher(max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds,
                             preferred_batch_size=list(config.dynamic_batching.preferred_batch_size) or None)
    # the Python backend's stub links the system libpython; the interpreter's own library folder first keeps its C
    # runtime matched to this interpreter's stdlib (a pyenv build otherwise fails to load the model)
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                                  os.environ.get("LD_LIBRARY_PATH")]))
    signal.signal(signal.SIGTERM, _interrupt)  # docker stop, systemd: the same orderly stop as Ctrl-C
    server = TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_secs=2)
    with Triton(config=server) as triton:
        triton.bind(model_name=model, infer_func=_onnx_infer(session, batching), inputs=tensors(config.input),
                    outputs=tensors(config.output), strict=True,
                    config=ModelConfig(batching=batching, max_batch_size=max(config.max_batch_size, 1),
                                       batcher=batcher))
        triton.serve()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _onnx_infer(session, batching: bool):
    """PyTriton's infer callable: the requests one dynamic batch brought, those of one shape concatenated along the
    batch dim into one ONNX Runtime run (as Triton's backend runs a formed batch), the outputs split back."""
    names = [o.name for o in session.get_outputs()]

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = tuple((k, v.shape[1:]) for k, v in sorted(r.items())) if batching else (i,)
            groups.setdefault(key, []).append(i)
        results: list[dict[str, np.ndarray]] = [{} for _ in requests]
        for members in groups.values():
            feed = {k: np.concatenate([requests[i][k] for i in members]) for k in requests[members[0]]}
            outs = session.run(names, feed)
            start = 0
            for i in members:
                n = len(next(iter(requests[i].values())))
                results[i] = {k: v[start:start + n] for k, v in zip(names, outs)}
                start += n
        return results

    return infer


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.cli import Parser, cli_main

    p = Parser(prog="python -m pipeline.triton_serve serve", description="Serve one ONNX model of a repository through "
               "PyTriton's tritonserver, ONNX Runtime on the CPU standing in for Triton's onnxruntime backend.")
    p.add_argument("command", choices=["serve"])
    p.add_argument("repository", help="write_repository's output folder, or its triton/ folder")
    p.add_argument("--model", required=True, help="the model's folder name, e.g. student_onnx")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")

    def run(args) -> None:
        serve(args.repository, args.model, http_port=args.http_port, grpc_port=args.grpc_port,
              metrics_port=args.metrics_port, threads=args.threads)

    return cli_main(p, run, argv, interrupted="stopped")


__all__ = ["TritonBackend", "main", "open_segmenter", "read_record", "serve"]


if __name__ == "__main__":
    raise SystemExit(main())
