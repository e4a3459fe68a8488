"""DeepStream Gst-nvinfer configuration for a run's float-input ONNX graphs and TensorRT plans (pipeline.triton writes
it beside the Triton repository).

Key names are those gstnvinfer_property_parser.h parses; docs/triton-and-deepstream.md cites the sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.artifacts import ARTIFACTS, Metadata
from pipeline.errors import InputError

if TYPE_CHECKING:
    from pipeline.triton import TensorSpec

NETWORK_MODES = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode (NvDsInferNetworkMode)


def deepstream_problem(meta: Metadata) -> str | None:
    """Why nvinfer cannot run an artifact as written, or None."""
    if meta.contract.input == "uint8":
        return ("nvinfer feeds the network float planar data (y = net-scale-factor * (x - offsets)), not the uint8 "
                "BGR frames this graph takes; use the float export (export.input=float) for nvinfer, or "
                "Gst-nvinferserver with the Triton repository")
    if ARTIFACTS[meta.kind].format == "onnx" and meta.precision == "int8":
        # nvdsinfer_model_builder.cpp: INT8 mode without an int8-calib-file logs "Trying FP16 mode" and builds FP16
        return ("nvinfer builds an ONNX graph in INT8 only from a calibration table (int8-calib-file), and this Q/DQ "
                "graph carries its scales inside; give nvinfer the INT8 plan built from it (trt.build) instead")
    return None


def _network_size(artifact: Path, meta: Metadata, inp: TensorSpec) -> tuple[int, int]:
    h, w = inp.shape[2:4]
    if h > 0 and w > 0:
        return h, w
    if meta.contract.size:
        return int(meta.contract.size[0]), int(meta.contract.size[1])
    profile = (meta.details.get("inputs") or [{}])[0].get("profile")
    if profile:
        return int(profile["opt"][2]), int(profile["opt"][3])
    raise InputError(f"{artifact}: a dynamic-size graph with no preferred size in its record (contract.size); "
                     "export it at a size for DeepStream")


def deepstream_config(artifact: Path, meta: Metadata, labels: Path, tensors: tuple[TensorSpec, TensorSpec], *,
                      batch_size: int | None = None, relative_to: Path | None = None) -> str:
    """A Gst-nvinfer [property] group for the artifact (key names as gstnvinfer_property_parser.h spells them):
    a primary semantic-segmentation network (network-type 2) on float NCHW RGB input, its output blob, network size,
    precision and batch from the file and record, the normalisation as net-scale-factor and offsets, the labels.
    A labels graph (int32 class ids) goes out as raw tensor meta (network-type 100, output-tensor-meta) because
    nvinfer's segmentation parser reads float C x H x W scores. Paths are written relative to `relative_to` (nvinfer
    resolves them against the config file's folder) when given. `batch_size`: of a dynamic-batch network (1 if not
    given); a static-batch one's is its own."""
    problem = deepstream_problem(meta)
    if problem:
        raise InputError(f"{artifact}: {problem}")
    inp, out = tensors  # triton.graph_tensors: the names and shapes the graph itself has
    h, w = _network_size(artifact, meta, inp)
    batch = meta.contract.batch or batch_size or 1
    mode = NETWORK_MODES[meta.precision]

    def ref(p: Path) -> str:
        return os.path.relpath(p, relative_to) if relative_to is not None else str(p)

    if artifact.suffix == ".onnx":  # nvinfer builds the engine on first run and saves it under this name
        engine = artifact.with_name(f"{artifact.name}_b{batch}_gpu0_{('fp32', 'int8', 'fp16')[mode]}.engine")
        model = [f"onnx-file={ref(artifact)}",
                 "# the engine nvinfer builds from the graph on the first run (nvdsinfer_model_builder.cpp's name);",
                 "# later runs load it instead of building again", f"model-engine-file={ref(engine)}"]
    else:
        model = ["# a plan runs only on the GPU model and TensorRT version it was built with (record details.gpu)",
                 f"model-engine-file={ref(artifact)}"]
    lines = [f"# Gst-nvinfer configuration for {meta.file or artifact.name} ({meta.kind}), written by pipeline.triton",
             "[property]",
             "gpu-id=0", "gie-unique-id=1", "# primary mode: whole frames", "process-mode=1", "interval=0", *model,
             "# 0 FP32, 1 INT8, 2 FP16: the artifact's precision", f"network-mode={mode}", f"batch-size={batch}",
             "# channels;height;width of the network input (NCHW)", f"infer-dims=3;{h};{w}",
             *_normalisation(meta), "# stretched to the network size with bilinear filtering, as Segmenter does",
             "maintain-aspect-ratio=0", "scaling-filter=1", f"output-blob-names={out.name}",
             f"labelfile-path={ref(labels)}"]
    if meta.contract.output == "logits":
        lines += [f"# semantic segmentation on the {meta.num_classes} x H/4 x W/4 logits: per pixel the class of the "
                  "highest score above", "# segmentation-threshold; nvinfer starts that maximum at -1 and refuses a "
                  "negative threshold, so a pixel", "# whose every logit is <= 0 is left unlabelled (-1)",
                  "network-type=2", f"num-detected-classes={meta.num_classes}", "segmentation-threshold=0.0"]
    else:
        lines += ["# int32 class ids N x H x W: attached to each frame as NvDsInferTensorMeta for a probe to read",
                  "network-type=100", "output-tensor-meta=1"]
    return "\n".join(lines) + "\n"


def _normalisation(meta: Metadata) -> list[str]:
    """nvinfer computes y = net-scale-factor * (x - offsets[c]) on 0..255 pixels in model-color-format order; ours is
    (x - mean[c]) / std[c] on RGB. The offsets are the mean exactly; one scale factor stands for three stds, so
    1 / mean(std) is used and each channel's input is scaled by std[c] / mean(std) of what the network was trained
    on (the worst channel's deviation is written in the comment)."""
    n = meta.normalization
    scale = 3.0 / sum(n.std)
    worst = max(abs(s * scale - 1.0) for s in n.std)
    return [f"# (x - mean) / std per channel on 0..255 RGB: offsets = mean; one net-scale-factor = 1 / mean(std), "
            f"so a channel's input is off by up to {worst:.2%}", "model-color-format=0",
            f"offsets={';'.join(f'{m:g}' for m in n.mean)}", f"net-scale-factor={scale:.10g}"]


__all__ = ["NETWORK_MODES", "deepstream_config", "deepstream_problem"]
