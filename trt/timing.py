"""Latency of a TensorRT engine, timed with CUDA events on its runner's stream (timing lives outside the runner):
our own engines through TrtRunner, any other through EngineRunner (`foreign_engine_step`, as trtexec times one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ExportError
from trt.engine import EngineRunner, describe_io, engine_precision, resolve_engine_shapes
from trt.runtime import EngineBase, TrtRunner, cuda_check, cudart


@contextmanager
def _events(rt: Any, count: int) -> Iterator[list[Any]]:
    events: list[Any] = []
    try:
        for _ in range(count):
            events.append(cuda_check("cudaEventCreate", rt.cudaEventCreate()))
        yield events
    finally:
        for event in events:
            cuda_check("cudaEventDestroy", rt.cudaEventDestroy(event))


def _record(rt: Any, event: Any, runner: EngineBase) -> None:
    cuda_check("cudaEventRecord", rt.cudaEventRecord(event, runner.stream))


def _elapsed(rt: Any, start: Any, end: Any) -> float:
    return float(cuda_check("cudaEventElapsedTime", rt.cudaEventElapsedTime(start, end)))


@contextmanager
def _cuda_graph(runner: EngineBase, rt: Any) -> Iterator[Any]:
    """One execute of `runner` captured on its stream, as an instantiated graph; destroyed on exit. Called with the
    runner's device current (time_compute): a capture belongs to the current device."""
    # TensorRT updates shape-dependent state on the first enqueue after set_input_shape, work that must stay out of
    # the graph: execute once before capturing
    runner.execute()
    runner.synchronize()
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls are not ours
    cuda_check("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(runner.stream, mode))
    # not runner.execute(): a failed enqueue must not raise before the capture is ended
    captured = runner.context.execute_async_v3(int(runner.stream))
    graph = cuda_check("cudaStreamEndCapture", rt.cudaStreamEndCapture(runner.stream))  # ended even on failure
    graph_exec = None
    try:
        if not captured:
            raise ExportError(f"{runner.plan}: TensorRT could not be captured in a CUDA graph: {runner.last_error()}")
        graph_exec = cuda_check("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
        yield graph_exec
    finally:
        if graph_exec is not None:
            cuda_check("cudaGraphExecDestroy", rt.cudaGraphExecDestroy(graph_exec))
        if graph is not None:
            cuda_check("cudaGraphDestroy", rt.cudaGraphDestroy(graph))


def time_compute(runner: EngineBase, iterations: int, warmup: int, cuda_graph: bool = False) -> list[float]:
    """Milliseconds per execute (the input already on the device), or per launch of a CUDA graph of one execute.
    Each iteration waits for the last, so the host's launch overhead counts: what a CUDA graph saves. Events, capture
    and launches happen with the runner's device current (a runner on cuda:1 captures on device 1)."""
    rt = cudart()
    with runner.on_device():
        runner.bind()
        runner.copy_to_device()
        with _events(rt, 2) as (start, end), _cuda_graph(runner, rt) if cuda_graph else nullcontext() as graph_exec:
            times = []
            for i in range(warmup + iterations):
                _record(rt, start, runner)
                if graph_exec is None:
                    runner.execute()
                else:
                    cuda_check("cudaGraphLaunch", rt.cudaGraphLaunch(graph_exec, runner.stream))
                _record(rt, end, runner)
                cuda_check("cudaEventSynchronize", rt.cudaEventSynchronize(end))
                if i >= warmup:
                    times.append(_elapsed(rt, start, end))
    return times


def time_copies(runner: EngineBase, iterations: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per iteration for H2D, execute, D2H and all three, pinned host buffers to pinned host buffers,
    of whatever the runner's host inputs hold."""
    rt = cudart()
    times: dict[str, list[float]] = {"h2d": [], "compute": [], "d2h": [], "total": []}
    with runner.on_device(), _events(rt, 4) as (e0, e1, e2, e3):
        runner.bind()
        for i in range(warmup + iterations):
            _record(rt, e0, runner)
            runner.copy_to_device()
            _record(rt, e1, runner)
            runner.execute()
            _record(rt, e2, runner)
            runner.copy_to_host()
            _record(rt, e3, runner)
            cuda_check("cudaEventSynchronize", rt.cudaEventSynchronize(e3))
            if i >= warmup:
                for key, (a, b) in zip(times, ((e0, e1), (e1, e2), (e2, e3), (e0, e3))):
                    times[key].append(_elapsed(rt, a, b))
    return times


def time_end_to_end(runner: TrtRunner, x: np.ndarray, iterations: int, warmup: int) -> dict[str, list[float]]:
    """time_copies with `x` as the input (the numpy copies into and out of the pinned buffers are host work that
    CUDA events do not see)."""
    runner.load(x)
    return time_copies(runner, iterations, warmup)


def foreign_engine_step(plan: Path, shapes: dict[str, tuple[int, ...]], batch: int, size: tuple[int, int] | None,
                        cuda_graph: bool, e2e: bool,
                        seed: int = 0) -> tuple[dict, Callable[[int], dict[str, list[float]]]]:
    """An engine this pipeline did not make, timed as trtexec times it: its I/O read from the engine, input shapes
    from `shapes` (--shapes), else `batch` and `size` for the dynamic dims, within profile 0 (resolve_engine_shapes),
    seeded random input in each input's type. Returns (info, step): what was timed, and step(n) -> milliseconds of n
    iterations: "compute" (one execute, or one CUDA graph launch), with `e2e` also "h2d", "d2h" and "end_to_end"
    (the three in a row). ExportError where TensorRT, cuda-python or a GPU is missing, as for TrtRunner."""
    runner = EngineRunner(plan)
    try:
        runner.set_shapes(resolve_engine_shapes(runner.tensors, shapes, batch, size, str(plan)))
        runner.fill_random(seed)
    except BaseException:
        runner.close()
        raise
    inputs, outputs = describe_io(runner.tensors, runner.shapes)
    info = {"backend": "tensorrt", "device": "cuda", "precision": engine_precision(runner.tensors), "batch": batch,
            "size": f"{size[0]}x{size[1]}" if size else "-", "inputs": inputs, "outputs": outputs}

    def step(n: int) -> dict[str, list[float]]:
        ms = {"compute": time_compute(runner, n, 0, cuda_graph=cuda_graph)}
        if e2e:
            copies = time_copies(runner, n, 0)
            ms.update(h2d=copies["h2d"], d2h=copies["d2h"], end_to_end=copies["total"])
        return ms

    return info, step
