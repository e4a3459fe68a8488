"""Segmenter: one interface over every artifact (PyTorch checkpoint, ONNX of any precision, TensorRT engine):
BGR uint8 frames in, class ids at the frames' own resolution out. Bench, accuracy, the ROS node and bag tools use it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import InputError

ENGINE_SUFFIXES = (".plan", ".engine")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_MODES = ("eager", "compile", "cudagraph")


@dataclass
class Contract:
    """What a network takes and gives (from the ONNX metadata, the engine sidecar or the checkpoint's meta)."""

    input: str  # "float": N x 3 x H x W normalised RGB; "uint8": N x H x W x 3 BGR as the camera gives it
    output: str  # "logits": N x classes x H/4 x W/4; "labels": N x H x W class ids
    size: tuple[int, int] | None  # the fixed H x W of a static network; None: the frame's own size (or `size=`)
    batch: int | None  # the fixed batch of a static network; None: any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    palette: list[tuple[int, int, int]]
    precision: str = "fp32"
    variant: str = ""

    @classmethod
    def from_metadata(cls, meta: dict[str, str], shape: Sequence[int | str], precision: str, source: Path) -> Contract:
        """From an exported graph's metadata props (pipeline/export.py) and its input shape."""
        try:
            kind = meta["input"]
            dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
            hw = (dims[1], dims[2]) if kind == "uint8" else (dims[2], dims[3])
            return cls(kind, meta["output"], hw if None not in hw else None, dims[0],
                       tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])), json.loads(meta["classes"]),
                       [tuple(c) for c in json.loads(meta["palette"])], precision, meta.get("variant", ""))
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise InputError(f"{source}: not a graph exported by this pipeline (metadata {e} missing or malformed; "
                             "re-export it with `python -m pipeline.run export`)") from None


class Backend(Protocol):
    """Runs the network on one prepared batch; `sync` waits for queued device work (for timing)."""

    name: str
    device: str

    def run(self, x: np.ndarray) -> np.ndarray | torch.Tensor: ...

    def sync(self) -> None: ...


class TorchBackend:
    name = "torch"

    def __init__(self, model, device: str = "auto", dtype: str = "fp32", mode: str = "eager") -> None:
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if mode not in TORCH_MODES:
            raise InputError(f"torch mode {mode!r}: expected one of {', '.join(TORCH_MODES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device {device!r}: no CUDA GPU is visible to PyTorch here")
        if mode == "cudagraph" and not device.startswith("cuda"):
            raise InputError("torch mode cudagraph: needs a CUDA device")
        self.device, self.dtype, self.mode = device, DTYPES[dtype], mode
        self.model = model.to(device).eval()
        if device.startswith("cuda"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if mode == "compile" else self.model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in = self.static_out = torch.empty(0)

    def _call(self, t: torch.Tensor) -> torch.Tensor:
        # autocast, as in training: LayerNorm and Softmax stay FP32, matmuls and convs run in fp16 / bf16
        with torch.inference_mode(), torch.autocast(t.device.type, self.dtype, enabled=self.dtype != torch.float32):
            return self.forward(t).float()

    def _capture(self, x: np.ndarray) -> None:
        """One CUDA graph for this input shape: warm-up on a side stream, then capture (PyTorch's recipe)."""
        self.static_in = torch.from_numpy(x).to(self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._call(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self._call(self.static_in)

    def run(self, x: np.ndarray) -> torch.Tensor:
        if self.mode != "cudagraph":
            return self._call(torch.from_numpy(x).to(self.device, non_blocking=True))
        if self.graph is None or tuple(self.static_in.shape) != x.shape:
            self._capture(x)
        self.static_in.copy_(torch.from_numpy(x), non_blocking=True)
        assert self.graph is not None
        self.graph.replay()
        return self.static_out

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class OrtBackend:
    """ONNX Runtime with input and (static) output buffers bound once and reused on every call."""

    name = "onnxruntime"

    def __init__(self, path: Path, provider: str = "auto", threads: int = 0) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if provider == "auto":
            provider = next((p for p in ("tensorrt", "cuda") if PROVIDERS[p] in available), "cpu")
        if provider not in PROVIDERS:
            raise InputError(f"provider {provider!r}: expected auto, {', '.join(PROVIDERS)}")
        if PROVIDERS[provider] not in available:
            raise InputError(f"provider {provider}: ONNX Runtime {ort.__version__} here offers only "
                             f"{', '.join(available)} (the GPU providers come with onnxruntime-gpu)")
        order = ["tensorrt", "cuda", "cpu"]  # each falls back to the next for the nodes it does not take
        chain = [PROVIDERS[p] for p in order[order.index(provider):] if PROVIDERS[p] in available]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: Q/DQ graphs log a warning per scale it cannot constant-fold
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=chain)
        except Exception as e:  # ORT raises its own Fail / InvalidGraph / NoSuchFile types
            raise InputError(f"{path}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[0]})") from None
        self.device = "cuda" if provider != "cpu" else "cpu"
        self.provider = provider
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        self.binding = self.session.io_binding()
        # a static output is written straight into one buffer, bound once; a dynamic one is allocated per call
        self.out = None
        if all(isinstance(d, int) for d in out.shape):
            self.out = np.empty(out.shape, np.int32 if "int32" in out.type else np.float32)
            self.binding.bind_output(self.output_name, "cpu", 0, self.out.dtype, list(self.out.shape),
                                     self.out.ctypes.data)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The output for `x`; a static output is returned in the backend's own buffer, which the next call
        overwrites."""
        b = self.binding
        b.bind_cpu_input(self.input_name, x)
        if self.out is None:
            b.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(b)
        return self.out if self.out is not None else b.copy_outputs_to_cpu()[0]

    def sync(self) -> None:
        pass  # run_with_iobinding returns when the outputs are in host memory


class TrtBackend:
    """A TensorRT engine through trt/runtime.py (GPU machines with TensorRT only)."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, path: Path) -> None:
        from trt.runtime import TrtRunner

        self.runner = TrtRunner(path)

    def run(self, x: np.ndarray) -> np.ndarray:
        if tuple(x.shape) != tuple(self.runner.input_shape):
            self.runner.set_input_shape(x.shape)
        return self.runner.infer(x)

    def sync(self) -> None:
        pass  # infer synchronises its stream


class Segmenter:
    """`Segmenter.open(path)`, then `predict(bgr)` -> class ids (uint8) at the frame's resolution."""

    def __init__(self, backend: Backend, contract: Contract, path: Path, size: tuple[int, int] | None = None,
                 default_size: tuple[int, int] | None = None) -> None:
        self.backend, self.contract, self.path = backend, contract, path
        if size is not None and contract.size is not None and tuple(size) != contract.size:
            raise InputError(f"{path}: size {size[0]}x{size[1]} asked, but the network is fixed at "
                             f"{contract.size[0]}x{contract.size[1]}")
        wanted = size or default_size
        self.size = contract.size or (tuple(wanted) if wanted else None)
        if len(contract.classes) > 256:
            raise InputError(f"{path}: {len(contract.classes)} classes do not fit the uint8 class-id map")
        self._lut = np.zeros((256, 3), np.uint8)
        self._lut[:len(contract.palette)] = np.asarray(contract.palette, np.uint8).reshape(-1, 3)
        self._bufs: list[np.ndarray] = []  # network input batches, allocated once per shape and reused
        self._mean = np.asarray(contract.mean, np.float32)
        self._std = np.asarray(contract.std, np.float32)

    # ------------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, device: str = "auto", provider: str = "auto", threads: int = 0,
             dtype: str = "fp32", mode: str = "eager", deploy: bool = False,
             size: tuple[int, int] | None = None, default_size: tuple[int, int] | None = None) -> Segmenter:
        """Picks the backend from the file: `.plan`/`.engine` TensorRT, `.onnx` ONNX Runtime (`provider`), anything
        else `load_model` reads (our safetensors, Hugging Face, NVlabs, mmseg) PyTorch on `device` in `dtype`
        (autocast), `mode` eager, compile (torch.compile) or cudagraph; `deploy` runs the reparameterised copy the
        export traces (`deploy_copy`: folded decode head, Mix-FFN as convs; off: the model as trained).
        `size` fixes the network resolution where the artifact does not (PyTorch, dynamic ONNX) and must equal a
        static graph's; `default_size` is used only where the artifact fixes none."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such artifact")
        if path.suffix in ENGINE_SUFFIXES:
            return cls._open_engine(path, size, default_size)
        if path.suffix == ".onnx":
            from trt.build import inspect_onnx

            info = inspect_onnx(path)
            if len(info.inputs) != 1 or len(info.outputs) != 1:
                raise InputError(f"{path}: expected one input and one output, found {len(info.inputs)} and "
                                 f"{len(info.outputs)}")
            contract = Contract.from_metadata(info.metadata, info.inputs[0].shape, info.precision, path)
            return cls(OrtBackend(path, provider, threads), contract, path, size, default_size)
        from pipeline.models import deploy_copy, load_model

        model = load_model(path)
        if deploy:
            model = deploy_copy(model)
        meta = model.meta
        contract = Contract("float", "logits", None, None, tuple(meta.mean), tuple(meta.std), list(meta.classes),
                            [tuple(c) for c in meta.palette], dtype, model.config.variant)
        return cls(TorchBackend(model, device, dtype, mode), contract, path, size, default_size)

    @classmethod
    def _open_engine(cls, path: Path, size: tuple[int, int] | None,
                     default_size: tuple[int, int] | None) -> Segmenter:
        from trt.runtime import load_sidecar

        side = load_sidecar(path)
        try:
            (inp,) = side["inputs"]
            shape = [d if isinstance(d, int) else "?" for d in inp["shape"]]
        except (KeyError, ValueError, TypeError):
            raise InputError(f"{path}.json: expected one input with a shape in 'inputs'") from None
        contract = Contract.from_metadata(side.get("metadata", {}), shape, side.get("precision", "?"), path)
        return cls(TrtBackend(path), contract, path, size, default_size)

    # ------------------------------------------------------------------------------------------------ the path
    @property
    def classes(self) -> list[str]:
        return self.contract.classes

    def _frames(self, images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
            frames = [images]  # refused below, with its shape
        else:
            frames = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        for f in frames:
            if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                got = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
                raise InputError(f"{self.path.name}: expected H x W x 3 uint8 BGR frames, got {got}")
        if not frames:
            raise InputError(f"{self.path.name}: no frames to segment")
        return frames

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """The network inputs for `images`, in batches of the network's fixed batch (the last one padded with
        zeros) or one batch. Every frame is resized to the network size (INTER_LINEAR, as in evaluation and
        calibration); with no fixed size all frames must share one. The returned arrays are reused by the next
        call: copy them to keep them."""
        frames = self._frames(images)
        h, w = self.size or frames[0].shape[:2]
        if self.size is None and any(f.shape[:2] != (h, w) for f in frames):
            raise InputError(f"{self.path.name}: frames of different sizes in one batch and no network size set")
        per = self.contract.batch or len(frames)
        shape = (per, h, w, 3) if self.contract.input == "uint8" else (per, 3, h, w)
        dtype = np.uint8 if self.contract.input == "uint8" else np.float32
        count = -(-len(frames) // per)
        if self._bufs and self._bufs[0].shape != shape:
            self._bufs = []
        while len(self._bufs) < count:
            self._bufs.append(np.empty(shape, dtype))
        for k in range(count):
            chunk = frames[k * per:(k + 1) * per]
            for i, f in enumerate(chunk):
                self._fill(self._bufs[k], i, f, h, w)
            self._bufs[k][len(chunk):] = 0
        return self._bufs[:count]

    def _fill(self, buf: np.ndarray, i: int, frame: np.ndarray, h: int, w: int) -> None:
        same = frame.shape[:2] == (h, w)
        if self.contract.input == "uint8":
            if same:
                buf[i] = frame
            else:
                cv2.resize(frame, (w, h), dst=buf[i], interpolation=cv2.INTER_LINEAR)
            return
        rgb = (frame if same else cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR))[:, :, ::-1]
        for c in range(3):  # (x - mean) / std straight into the NCHW buffer, as export.graph_input computes it
            np.subtract(rgb[:, :, c], self._mean[c], out=buf[i, c], dtype=np.float32)
            np.divide(buf[i, c], self._std[c], out=buf[i, c])

    def postprocess(self, out: np.ndarray | torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Class ids at each frame's size: logits upsampled bilinearly then argmax (as the evaluator scores them),
        labels resized with nearest neighbour where the frame is not at the network size."""
        on_gpu = isinstance(out, torch.Tensor) and out.device.type != "cpu"
        ids = []
        for i, (h, w) in enumerate(sizes):
            if self.contract.output == "logits" and on_gpu:
                up = F.interpolate(out[i:i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)
                ids.append(up.argmax(1)[0].to(torch.uint8).cpu().numpy())
            elif self.contract.output == "logits":
                # OpenCV's INTER_LINEAR uses the same half-pixel centres as align_corners=False (the same ids),
                # about 5x faster than F.interpolate on the CPU; it takes up to 512 channels
                chw = out[i].numpy() if isinstance(out, torch.Tensor) else out[i]
                hwc = np.ascontiguousarray(chw.transpose(1, 2, 0), dtype=np.float32)
                up = cv2.resize(hwc, (w, h), interpolation=cv2.INTER_LINEAR) if hwc.shape[:2] != (h, w) else hwc
                ids.append(up.reshape(h, w, -1).argmax(-1).astype(np.uint8))
            else:
                lab = (out[i].cpu().numpy() if isinstance(out, torch.Tensor) else out[i]).astype(np.uint8)
                ids.append(lab if lab.shape == (h, w) else cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST))
        return ids

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """H x W x 3 BGR uint8 -> H x W uint8 class ids; a batch (N x H x W x 3 or a list) -> N maps (an array
        when all frames share a size, else a list)."""
        frames = self._frames(images)
        ids: list[np.ndarray] = []
        batches = self.preprocess(frames)
        per = len(frames) if self.contract.batch is None else self.contract.batch
        for k, x in enumerate(batches):
            chunk = frames[k * per:(k + 1) * per]
            ids += self.postprocess(self.backend.run(x), [f.shape[:2] for f in chunk])
        if isinstance(images, np.ndarray) and images.ndim == 3:
            return ids[0]
        return np.stack(ids) if len({m.shape for m in ids}) == 1 else ids

    def colorize(self, ids: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
        """The palette colours of `ids` as RGB uint8; blended over `image` (BGR uint8, same H x W) with weight
        `alpha` for the colours when given."""
        rgb = self._lut[ids]
        if image is None:
            return rgb
        if image.shape[:2] != ids.shape[:2]:
            raise InputError(f"colorize: image {image.shape[:2]} and class map {ids.shape[:2]} differ in size")
        return cv2.addWeighted(rgb, alpha, np.ascontiguousarray(image[:, :, ::-1]), 1.0 - alpha, 0.0)

    def describe(self) -> dict:
        c = self.contract
        return {"artifact": str(self.path), "backend": self.backend.name, "device": self.backend.device,
                "precision": c.precision, "input": c.input, "output": c.output,
                "size": list(self.size) if self.size else None, "batch": c.batch, "variant": c.variant,
                **({"provider": self.backend.provider} if isinstance(self.backend, OrtBackend) else {}),
                **({"mode": self.backend.mode} if isinstance(self.backend, TorchBackend) else {})}


__all__ = ["Contract", "OrtBackend", "Segmenter", "TorchBackend", "TrtBackend"]
