"""The deployable student graph and its ONNX export, checked against PyTorch on real frames before it is kept."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ExportError
from pipeline.evaluate import ConfusionMatrix, EvalResult
from pipeline.io import atomic_path, sha256_file, write_json
from pipeline.models.segformer import SegFormer, deploy_copy

log = logging.getLogger("pipeline")

INPUT_NAME = "image"
# The deployed graph contract: (input kind) -> what the graph takes; (output kind) -> what it returns.
INPUTS = {"float": "N x 3 x H x W float32 RGB, normalised outside ((x - mean) / std, 0..255 scale)",
          "uint8": "N x H x W x 3 uint8 BGR, as cameras and OpenCV deliver it; normalised inside"}
OUTPUTS = {"logits": "N x classes x H/4 x W/4 float32 logits",
           "labels": "N x H x W int32 class ids (bilinear upsample to the input size and argmax inside)"}


@dataclass
class ExportSpec:
    """What the exported graph looks like; recorded in every sidecar."""

    input: str = "float"  # float | uint8
    output: str = "logits"  # logits | labels
    size: tuple[int, int] = (512, 1024)  # H x W of the static graph (and the opt shape of a dynamic one)
    batch: int = 1
    dynamic: bool = False  # dynamic batch, height and width
    opset: int = 17  # >= 17: native LayerNormalization (a decomposed one overflows in FP16)

    def check(self) -> None:
        if self.input not in INPUTS:
            raise ExportError(f"export.input={self.input!r}: expected one of {', '.join(INPUTS)}")
        if self.output not in OUTPUTS:
            raise ExportError(f"export.output={self.output!r}: expected one of {', '.join(OUTPUTS)}")
        if self.opset < 17:
            raise ExportError(f"export.opset={self.opset}: expected >= 17 (native LayerNormalization)")
        if min(self.size) < 32 or self.batch < 1:
            raise ExportError(f"export size {self.size} / batch {self.batch}: expected sides >= 32, batch >= 1")


class DeployModel(nn.Module):
    """The student as deployed: optional uint8 BGR NHWC preprocessing in front, optional upsample + argmax
    behind. Nothing else: no distillation taps, no training modules. `with_logits` adds the 1/4 logits as a
    second output, for the parity check of a labels graph only."""

    def __init__(self, model: SegFormer, spec: ExportSpec, with_logits: bool = False, fold: bool = True) -> None:
        super().__init__()
        # the graph is traced from the reparameterised deploy copy (decode head folded, Mix-FFN as convs: the same
        # logits to float rounding, 2.7x fewer MACs for B0); the parity check's PyTorch reference is the model as
        # trained (fold=False), so parity also checks the reparameterisation
        self.model = deploy_copy(model) if fold else model.eval()
        self.spec, self.with_logits = spec, with_logits
        mean, std = torch.tensor(model.meta.mean), torch.tensor(model.meta.std)
        # (x - mean) / std as one multiply-add on the RGB channels
        self.register_buffer("scale", (1.0 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor):
        if self.spec.input == "uint8":
            x = x.flip(-1).permute(0, 3, 1, 2).float() * self.scale + self.shift  # BGR NHWC -> RGB NCHW
        logits = self.model(x)
        if self.spec.output == "logits":
            return logits
        labels = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        return (labels.to(torch.int32), logits) if self.with_logits else labels.to(torch.int32)


def graph_input(rgb: np.ndarray, spec: ExportSpec, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One RGB uint8 frame as the graph takes it (batch of 1), resized to the export size: the preprocessing
    parity, calibration and accuracy all share, and what a deployment does in front of a float graph."""
    h, w = spec.size
    if rgb.shape[:2] != (h, w):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    if spec.input == "uint8":
        return np.ascontiguousarray(rgb[None, :, :, ::-1])
    x = (rgb.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def spread(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over a split of `n` frames (all of them for count <= 0 or >= n)."""
    if count <= 0 or count >= n:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, count).round()]


def frames(dataset, count: int, spec: ExportSpec, mean, std) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` (graph input, full-resolution label) pairs spread over the dataset (all of it for count <= 0)."""
    n = len(dataset)
    if n == 0:
        raise ExportError(f"{dataset}: no frames to check the export with")
    out = []
    for i in spread(n, count):
        rgb, label = dataset.read(int(i))
        out.append((graph_input(rgb, spec, mean, std), label))
    return out


def _metadata(model: SegFormer, spec: ExportSpec, source: str) -> dict[str, str]:
    meta = model.meta
    return {
        "classes": json.dumps(list(meta.classes)), "palette": json.dumps([list(c) for c in meta.palette]),
        "mean": json.dumps(list(meta.mean)), "std": json.dumps(list(meta.std)),
        "input": spec.input, "input_layout": INPUTS[spec.input], "output": spec.output,
        "output_layout": OUTPUTS[spec.output], "input_size": f"{spec.size[0]}x{spec.size[1]}",
        "variant": model.config.variant, "source_sha256": source,
    }


def export_onnx(model: SegFormer, path: Path, spec: ExportSpec, source_sha256: str = "",
                simplify: bool = True) -> Path:
    """Trace the deploy graph to ONNX with an extra `logits` output kept for the parity check (stripped by
    `finalize`), run onnx's full checker, simplify, and stamp the metadata. Writes `path` atomically."""
    import onnx

    spec.check()
    parity_output = spec.output == "labels"
    deploy = DeployModel(model.cpu(), spec, with_logits=parity_output)
    h, w = spec.size
    if spec.input == "uint8":
        dummy = torch.zeros(spec.batch, h, w, 3, dtype=torch.uint8)
        axes = {0: "batch", 1: "height", 2: "width"}
    else:
        dummy = torch.zeros(spec.batch, 3, h, w)
        axes = {0: "batch", 2: "height", 3: "width"}
    names = [spec.output, "parity_logits"] if parity_output else [spec.output]
    dynamic = None
    if spec.dynamic:
        dynamic = {INPUT_NAME: axes, **{n: {0: "batch", 2: "height/4", 3: "width/4"} for n in names},
                   "labels": {0: "batch", 1: "height", 2: "width"}}
        dynamic = {k: v for k, v in dynamic.items() if k == INPUT_NAME or k in names}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(deploy, (dummy,), str(raw), opset_version=spec.opset, dynamo=False,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic,
                              do_constant_folding=True)
        graph = onnx.load(str(raw))
        if simplify:
            graph = _simplify(graph)
        del graph.metadata_props[:]
        for k, v in _metadata(model, spec, source_sha256).items():
            graph.metadata_props.add(key=k, value=v)
        with atomic_path(path) as out:
            onnx.save(graph, str(out))
            try:
                onnx.checker.check_model(str(out), full_check=True)
            except onnx.checker.ValidationError as e:
                raise ExportError(f"{path}: the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    return path


def _simplify(graph):
    """onnxslim folds the shape arithmetic the tracer leaves behind; a graph it cannot handle stays as traced."""
    try:
        import onnxslim
    except ImportError:
        log.info("onnxslim is not installed: keeping the traced graph unsimplified")
        return graph
    try:
        return onnxslim.slim(graph)
    except Exception as e:  # a simplifier bug must not cost the export: the traced graph is valid
        log.warning("onnxslim failed (%s); keeping the traced graph", str(e).splitlines()[0] if str(e) else e)
        return graph


def finalize(path: Path) -> None:
    """Drop the parity-only `parity_logits` output, leaving the deployed contract (one input, one output)."""
    import onnx

    graph = onnx.load(str(path))
    keep = [o for o in graph.graph.output if o.name != "parity_logits"]
    if len(keep) == len(graph.graph.output):
        return
    del graph.graph.output[:]
    graph.graph.output.extend(keep)
    with atomic_path(path) as out:
        onnx.save(graph, str(out))
        onnx.checker.check_model(str(out), full_check=True)


class OrtRunner:
    """An ONNX Runtime CPU session returning every graph output for one input batch."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise ExportError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {INPUT_NAME: x})))


def one_frame(run: Callable[[np.ndarray], dict[str, np.ndarray]], spec: ExportSpec):
    """A runner of a static batch-N graph taking one frame: the frame repeated N times, the first result kept."""
    if spec.dynamic or spec.batch == 1:
        return run
    return lambda x: {k: v[:1] for k, v in run(np.repeat(x, spec.batch, axis=0)).items()}


def torch_runner(model: SegFormer, spec: ExportSpec) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    deploy = DeployModel(model.cpu(), spec, with_logits=spec.output == "labels", fold=False)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = deploy(torch.from_numpy(x))
        if spec.output == "labels":
            return {"labels": out[0].numpy(), "parity_logits": out[1].numpy()}
        return {"logits": out.numpy()}

    return run


def _logits(out: dict[str, np.ndarray]) -> np.ndarray:
    return out["parity_logits"] if "parity_logits" in out else out["logits"]


def parity(reference: Callable, candidate: Callable, inputs: Sequence[np.ndarray]) -> dict:
    """Max abs logit difference and argmax agreement of `candidate` against `reference` on the same inputs;
    for a labels graph the agreement is that of the labels it outputs."""
    worst, same, total = 0.0, 0, 0
    for x in inputs:
        a, b = reference(x), candidate(x)
        la, lb = _logits(a), _logits(b)
        worst = max(worst, float(np.abs(la.astype(np.float64) - lb.astype(np.float64)).max()))
        ids_a = a["labels"] if "labels" in a and "labels" in b else la.argmax(1)
        ids_b = b["labels"] if "labels" in a and "labels" in b else lb.argmax(1)
        same += int((ids_a == ids_b).sum())
        total += ids_a.size
    return {"frames": len(inputs), "max_abs_logit_diff": worst, "argmax_agreement": same / max(total, 1)}


def check_parity(result: dict, path: Path, max_diff: float = 1e-3, min_agreement: float = 0.999) -> None:
    if result["max_abs_logit_diff"] > max_diff or result["argmax_agreement"] < min_agreement:
        raise ExportError(f"{path}: ONNX Runtime disagrees with PyTorch on {result['frames']} validation frames "
                          f"(max |logit diff| {result['max_abs_logit_diff']:.2e} > {max_diff:g} or argmax "
                          f"agreement {100 * result['argmax_agreement']:.3f} % < {100 * min_agreement:g} %); "
                          "the artifact was removed")


def artifact_miou(run: Callable, pairs: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int,
                  classes: Sequence[str]) -> EvalResult:
    """mIoU of any runner at full label resolution: logits upsampled bilinearly to the label size, as the
    PyTorch evaluator does, so every artifact and the PyTorch student are scored the same way."""
    cm = ConfusionMatrix(num_classes)
    for x, label in pairs:
        logits = torch.from_numpy(np.asarray(_logits(run(x)), np.float32))
        up = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        cm.update(up.argmax(1)[0], torch.from_numpy(label.astype(np.int64)))
    return cm.result(classes)


def sidecar(path: Path, model: SegFormer, spec: ExportSpec, **fields) -> Path:
    """`<artifact>.json`: the graph contract, provenance and measurements, next to the artifact."""
    import onnx
    import onnxruntime

    meta = model.meta
    info = {
        "artifact": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
        "variant": model.config.variant, "num_classes": model.config.num_classes, "classes": list(meta.classes),
        "palette": [list(c) for c in meta.palette],
        "normalization": {"mean": list(meta.mean), "std": list(meta.std), "space": "RGB, 0..255",
                          "inside_graph": spec.input == "uint8"},
        "spec": asdict(spec), "input": {"name": INPUT_NAME, "layout": INPUTS[spec.input]},
        "output": {"name": spec.output, "layout": OUTPUTS[spec.output]},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        **fields,
    }
    out = path.with_name(path.name + ".json")
    write_json(out, info)
    return out


def remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@dataclass
class ExportPlan:
    """Which artifacts to make and how to check them (the `export.*` config keys)."""

    spec: ExportSpec
    fp16: bool = True
    int8: bool = True
    parity_frames: int = 8
    calibration_frames: int = 32
    calibration_method: str = "entropy"  # entropy | max
    int8_backend: str = "modelopt"  # modelopt | ort (precision.to_int8)
    eval_frames: int = 0  # validation frames scored per artifact; 0: the whole split
    simplify: bool = True
    parity_max_diff: float = 1e-3  # max |logit difference| of the FP32 ONNX against PyTorch
    parity_min_agreement: float = 0.999  # argmax agreement of the FP32 ONNX with PyTorch


def writable_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ExportError(f"{out_dir}: output directory is not writable ({e.strerror or e})") from None
    return out_dir


def export_student(model: SegFormer, out_dir: Path, plan: ExportPlan, val_set, train_set,
                   source: Path | None = None) -> dict:
    """student.onnx (parity-checked), student.fp16.onnx, student.int8.onnx and their sidecars in `out_dir`,
    with the mIoU of every artifact next to the PyTorch student's; returns the report. On any failure no
    artifact of this call is left behind."""
    spec = plan.spec
    spec.check()
    out_dir = writable_dir(Path(out_dir))
    model = model.cpu().eval()
    mean, std, classes, k = model.meta.mean, model.meta.std, model.meta.classes, model.config.num_classes
    source_sha = sha256_file(source) if source and Path(source).is_file() else ""
    fp32, fp16, int8 = out_dir / "student.onnx", out_dir / "student.fp16.onnx", out_dir / "student.int8.onnx"
    made: list[Path] = []
    try:
        log.info("export: tracing %s (%s input, %s output, %dx%d%s) to %s", model.config.variant, spec.input,
                 spec.output, *spec.size, ", dynamic" if spec.dynamic else "", fp32)
        made.append(export_onnx(model, fp32, spec, source_sha, plan.simplify))
        reference = torch_runner(model, spec)
        checks = [x for x, _ in frames(val_set, plan.parity_frames, spec, mean, std)]
        runners = {"fp32": one_frame(OrtRunner(fp32), spec)}
        report: dict = {"spec": asdict(spec), "source": str(source or ""), "artifacts": {}}
        par = parity(reference, runners["fp32"], checks)
        check_parity(par, fp32, plan.parity_max_diff, plan.parity_min_agreement)
        log.info("export: parity on %d frames: max |logit diff| %.2e, argmax agreement %.4f %%", par["frames"],
                 par["max_abs_logit_diff"], 100 * par["argmax_agreement"])
        report["artifacts"]["fp32"] = {"file": fp32.name, "parity": par}
        if plan.fp16 or plan.int8:
            from pipeline import precision  # modelopt / onnxconverter-common: imported only when asked for
        if plan.fp16:
            made.append(fp16)
            info = precision.to_fp16(fp32, fp16)
            runners["fp16"] = one_frame(OrtRunner(fp16), spec)
            report["artifacts"]["fp16"] = {"file": fp16.name, "parity": parity(reference, runners["fp16"], checks),
                                           "conversion": info}
        if plan.int8:
            made.append(int8)
            calib = [x for x, _ in frames(train_set, plan.calibration_frames, spec, mean, std)]
            log.info("export: INT8 calibration on %d %s frames (%s, %s)", len(calib), train_set.split,
                     plan.calibration_method, plan.int8_backend)
            info = precision.to_int8(fp32, int8, np.concatenate(calib), method=plan.calibration_method,
                                     backend=plan.int8_backend)
            runners["int8"] = one_frame(OrtRunner(int8), spec)
            report["artifacts"]["int8"] = {"file": int8.name, "parity": parity(reference, runners["int8"], checks),
                                           "quantization": info}
        pairs = frames(val_set, plan.eval_frames, spec, mean, std)
        log.info("export: scoring PyTorch and %d ONNX artifact(s) on %d %s frames", len(runners), len(pairs),
                 val_set.split)
        torch_miou = artifact_miou(reference, pairs, k, classes)
        report["pytorch"] = {"miou": torch_miou.miou, "pixel_acc": torch_miou.pixel_acc}
        report["eval"] = {"dataset": val_set.name, "split": val_set.split, "frames": len(pairs),
                          "resolution": "full label"}
        for name, run in runners.items():
            res = artifact_miou(run, pairs, k, classes)
            entry = report["artifacts"][name]
            entry.update(miou=res.miou, pixel_acc=res.pixel_acc, miou_delta_vs_pytorch=res.miou - torch_miou.miou)
        del runners
        for name, entry in report["artifacts"].items():
            path = out_dir / entry["file"]
            finalize(path)
            entry["sha256"] = sha256_file(path)
            made.append(sidecar(path, model, spec, precision=name, source_sha256=source_sha,
                                parity=entry["parity"], miou=entry["miou"], pytorch_miou=torch_miou.miou,
                                eval=report["eval"], **{k2: v for k2, v in entry.items()
                                                        if k2 in ("conversion", "quantization")}))
    except BaseException:
        remove(*made)
        raise
    return report


def report_table(report: dict) -> str:
    """The artifacts side by side: parity against PyTorch and mIoU on the validation frames."""
    rows = ["| artifact | max abs logit diff | argmax agreement % | mIoU % | vs PyTorch |", "|---|---:|---:|---:|---:|",
            f"| PyTorch student | - | - | {100 * report['pytorch']['miou']:.2f} | - |"]
    for entry in report["artifacts"].values():
        p = entry["parity"]
        rows.append(f"| {entry['file']} | {p['max_abs_logit_diff']:.2e} | {100 * p['argmax_agreement']:.3f} | "
                    f"{100 * entry['miou']:.2f} | {100 * entry['miou_delta_vs_pytorch']:+.2f} |")
    return "\n".join(rows)
