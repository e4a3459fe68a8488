"""The deployable student graph and its ONNX export, checked against PyTorch on real frames before it is kept."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import artifacts, precision
from pipeline.artifacts import INPUT_NAME, Contract, Metadata, Normalization
from pipeline.config import Config, ExportConfig, validate
from pipeline.data.transforms import network_input
from pipeline.errors import ExportError
from pipeline.evaluate import score, spread
from pipeline.infer import Backend, OrtBackend, Segmenter, TorchBackend
from pipeline.io import atomic_path, sha256_file, writing
from pipeline.models.checkpoints import checkpoint_metadata
from pipeline.models.segformer import SegFormer, deploy_copy

log = logging.getLogger("pipeline")

# the export.* keys that shape the graph
GRAPH_FIELDS = ("input", "output", "size", "labels_size", "batch", "dynamic", "opset")
# export name -> artifact kind, in the order they are made
KINDS = {"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8", "int8-qad": "onnx-int8-qad"}
STAGING = ".staging"  # in the output directory: `export-*` folders, one per export while it runs
_LOCK = "lock"  # in an export's staging folder, held (flock) for the export's life


class DeployModel(nn.Module):
    """The student as deployed: optional uint8 BGR NHWC preprocessing in front, optional upsample + argmax
    behind. Nothing else: no distillation taps, no training modules. `with_logits` adds the 1/4 logits as a
    second output, for the parity check of a labels graph only."""

    def __init__(self, model: SegFormer, e: ExportConfig, with_logits: bool = False, fold: bool = True) -> None:
        super().__init__()
        # the graph is traced from the reparameterised deploy copy (decode head folded, Mix-FFN as convs: the same
        # logits to float rounding, 2.7x fewer MACs for B0); the parity check's PyTorch reference is the model as
        # trained (fold=False), so parity also checks the reparameterisation
        self.model = deploy_copy(model) if fold else model.eval()
        self.input, self.output, self.with_logits = e.input, e.output, with_logits
        self.labels_size = tuple(e.labels_size) if tuple(e.labels_size) != (0, 0) else None
        mean, std = torch.tensor(model.meta.mean), torch.tensor(model.meta.std)
        # (x - mean) / std as one multiply-add on the RGB channels
        self.register_buffer("scale", (1.0 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor):
        if self.input == "uint8":
            # Cast first, then BGR NHWC -> RGB NCHW: TensorRT restricts UINT8 tensors to network I/O and conversions
            # to and from float (TensorRT operator reference, Cast and Identity; INT8/UINT8 outside Q/DQ), so the flip
            # and the transpose run on float (exact for 0..255: the same numbers as before)
            x = x.float().flip(-1).permute(0, 3, 1, 2) * self.scale + self.shift
        logits = self.model(x)
        if self.output == "logits":
            return logits
        size = self.labels_size or x.shape[-2:]
        labels = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)
        return (labels.to(torch.int32), logits) if self.with_logits else labels.to(torch.int32)


def output_names(e: ExportConfig) -> list[str]:
    """The traced graph's outputs: a labels graph keeps its 1/4 logits as `parity_logits` until `finalize`."""
    return [e.output, "parity_logits"] if e.output == "labels" else [e.output]


def onnx_metadata(model: SegFormer, e: ExportConfig, source: Path | None = None) -> Metadata:
    """The FP32 graph's record: the model's label set and normalisation, the export's contract, the checkpoint's
    hash as provenance (every ONNX and engine made from it keeps that)."""
    import onnx
    import onnxruntime

    base = checkpoint_metadata(model, str(source or ""))
    return replace(base, kind="onnx", normalization=replace(base.normalization, inside_graph=e.input == "uint8"),
                   contract=Contract(e.input, e.output, list(e.size), None if e.dynamic else e.batch, e.dynamic,
                                     output_size=list(e.labels_size) if tuple(e.labels_size) != (0, 0) else None),
                   precision="fp32", source_sha256=sha256_file(source) if source and Path(source).is_file() else "",
                   versions={"torch": torch.__version__, "onnx": onnx.__version__,
                             "onnxruntime": onnxruntime.__version__},
                   measured={}, details={"opset": e.opset})


def export_onnx(model: SegFormer, path: Path, e: ExportConfig, meta: Metadata) -> Path:
    """Trace the deploy graph to ONNX with an extra `parity_logits` output for a labels graph (stripped by
    `finalize`), simplify, stamp the record `meta` in its metadata and run onnx's full checker. Writes `path`
    atomically."""
    import onnx

    deploy = DeployModel(model.cpu(), e, with_logits=e.output == "labels")
    h, w = e.size
    if e.input == "uint8":
        dummy = torch.zeros(e.batch, h, w, 3, dtype=torch.uint8)
        axes = {0: "batch", 1: "height", 2: "width"}
    else:
        dummy = torch.zeros(e.batch, 3, h, w)
        axes = {0: "batch", 2: "height", 3: "width"}
    names = output_names(e)
    dynamic = None
    if e.dynamic:
        dynamic = {INPUT_NAME: axes, **{n: {0: "batch", 2: "height/4", 3: "width/4"} for n in names},
                   "labels": {0: "batch"} if tuple(e.labels_size) != (0, 0) else {0: "batch", 1: "height", 2: "width"}}
        dynamic = {k: v for k, v in dynamic.items() if k == INPUT_NAME or k in names}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(deploy, (dummy,), str(raw), opset_version=e.opset, dynamo=False,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic,
                              do_constant_folding=True)
        graph = onnx.load(str(raw))
        if e.simplify:
            graph = _simplify(graph)
        del graph.metadata_props[:]
        for k, v in meta.onnx_props().items():
            graph.metadata_props.add(key=k, value=v)
        with atomic_path(path) as out:
            onnx.save(graph, str(out))
            try:
                onnx.checker.check_model(str(out), full_check=True)
            except onnx.checker.ValidationError as err:
                raise ExportError(f"{path}: the exported graph fails onnx.checker: "
                                  f"{str(err).splitlines()[0]}") from None
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


def graph_inputs(dataset, count: int, e: ExportConfig, norm: Normalization) -> list[np.ndarray]:
    """`count` frames spread over `dataset` (all of it for count <= 0), each a batch of one as the graph takes it
    (data.transforms.network_input at the export size): the parity and calibration frames."""
    if len(dataset) == 0:
        raise ExportError(f"{dataset}: no frames to check the export with")
    return [network_input(dataset.read(i)[0], e.size, norm.mean, norm.std, e.input)[None]
            for i in spread(len(dataset), count)]


def _logits(out: dict[str, np.ndarray]) -> np.ndarray:
    return out["parity_logits"] if "parity_logits" in out else out["logits"]


def compare(reference: Backend, candidate: Backend, inputs: Sequence[np.ndarray]) -> dict:
    """Two runners on the same inputs (Polygraphy's comparator): the max abs logit difference and the argmax
    agreement of `candidate` against `reference`; for a labels graph the agreement is that of the labels it
    outputs."""
    worst, same, total = 0.0, 0, 0
    for x in inputs:
        a, b = reference.infer(x), candidate.infer(x)
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


def remove(*paths: Path) -> None:
    """Files and folders, as far as the file system lets us (a read-only run directory is refused afterwards)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(OSError):
                p.unlink(missing_ok=True)


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """`<out_dir>/.staging/export-XXXX/`, where an export writes everything until all its checks passed: the
    artifacts and sidecars under their final names, and every temporary file of the tools it runs (temp_files_in).
    An exclusive lock on it lives as long as the export, so the next one knows a folder with a free lock for what a
    killed export left, and removes it first (remove_stale). The folder goes when the block ends, however."""
    remove_stale(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / STAGING).mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="export-", dir=out_dir / STAGING))
        lock = open(folder / _LOCK, "w")  # noqa: SIM115 (held until the block ends)
    except OSError as e:
        raise ExportError(f"{out_dir}: output directory is not writable ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        (folder / "tmp").mkdir()
        with precision.temp_files_in(folder / "tmp"):
            yield folder
    finally:
        remove(folder)
        lock.close()
        with suppress(OSError):
            (out_dir / STAGING).rmdir()  # when no other export is running here


def _alive(folder: Path) -> bool:
    """Whether the export that made `folder` still runs: it holds the folder's lock (the kernel frees it when the
    process dies, SIGKILL included)."""
    try:
        with open(folder / _LOCK) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        pass  # no lock file: killed before it made one
    return False


def remove_stale(out_dir: Path) -> None:
    """What a killed export left in `out_dir`: its staging folder and, beside the artifacts, the temporary files of
    a write it did not finish (and the `.student.int8.onnx.*` work folders of versions before the staging folder).
    A publish cut between the artifact's rename and its sidecar's is finished first, when the sidecar describes
    the artifact now under the final name."""
    root = out_dir / STAGING
    for folder in sorted(root.glob("export-*")) if root.is_dir() else []:
        if not _alive(folder):
            remove(folder)
    for name in (artifacts.run_file(kind) for kind in KINDS.values()):
        final, side = out_dir / name, artifacts.sidecar_path(out_dir / name)
        for pending in sorted(out_dir.glob(f".{side.name}.tmp*")):  # artifacts.publish's sidecar, written first
            with suppress(OSError, ValueError, AttributeError):
                if final.is_file() and json.loads(pending.read_text()).get("sha256") == sha256_file(final):
                    os.replace(pending, side)
        remove(*out_dir.glob(f".{name}.*"))
    with suppress(OSError):
        root.rmdir()


def check_export(e: ExportConfig) -> None:
    """The export settings, checked where config.py checks them; the size must be resolved (export_size)."""
    if min(e.size) < 1:
        raise ExportError(f"export size {e.size[0]}x{e.size[1]}: resolve it first (pipeline.config.export_size)")
    validate(Config(export=e))


def export_student(model: SegFormer, out_dir: Path, e: ExportConfig, val_set, train_set,
                   source: Path | None = None, qad: Path | None = None) -> dict:
    """student.onnx (parity-checked), student.fp16.onnx and student.int8.onnx as `e` asks, each with its sidecar,
    in `out_dir`: traced and checked against PyTorch, converted, finalized, then scored through Segmenter next to
    the PyTorch student; returns the report. Everything is made in a staging folder and published (each artifact
    renamed onto its final name, then its sidecar) only when every check passed: on any failure, or a kill, no
    final name changes, and what a killed export left is removed by the next one. `qad`: the qad stage's
    fake-quantized state of this student, exported as student.int8-qad.onnx with its learned ranges."""
    check_export(e)
    out_dir = Path(out_dir)
    with staging(out_dir) as stage, writing(out_dir, stage):  # OS errors name out_dir's files, not staged ones
        try:
            report, records = _make(model.cpu().eval(), stage, out_dir, e, val_set, train_set, source, qad)
        except ExportError as err:  # name the artifact, not its staging copy (removed when this block ends)
            raise ExportError(str(err).replace(f"{stage}{os.sep}", f"{out_dir}{os.sep}")) from None
        for entry in report["artifacts"].values():
            meta = artifacts.publish(stage / entry["file"], out_dir / entry["file"], records[entry["file"]])
            entry["sha256"] = meta.sha256
    return report


def _make(model: SegFormer, stage: Path, out_dir: Path, e: ExportConfig, val_set, train_set, source: Path | None,
          qad: Path | None = None):
    """Every artifact `e` asks for, made and checked in `stage` (to be published in `out_dir`): (the report, each
    file's record)."""
    meta = onnx_metadata(model, e, source)
    paths = {name: stage / artifacts.run_file(kind) for name, kind in KINDS.items()}
    made = [n for n in ("fp16", "int8") if getattr(e, n)] + (["int8-qad"] if qad else [])
    report: dict = {"spec": {k: getattr(e, k) for k in GRAPH_FIELDS}, "source": str(source or ""), "artifacts": {}}
    # the reference is the model as trained (fold=False), so parity also checks the reparameterisation
    reference = TorchBackend(DeployModel(model, e, with_logits=e.output == "labels", fold=False), "cpu",
                             outputs=output_names(e))
    checks = graph_inputs(val_set, e.parity_frames, e, meta.normalization)
    log.info("export: tracing %s (%s input, %s output, %dx%d%s) to %s", model.config.variant, e.input,
             e.output, *e.size, ", dynamic" if e.dynamic else "", out_dir / paths["fp32"].name)
    export_onnx(model, paths["fp32"], e, meta)
    par = compare(reference, OrtBackend(paths["fp32"], "cpu"), checks)
    check_parity(par, out_dir / paths["fp32"].name, e.parity_max_diff, e.parity_min_agreement)
    log.info("export: parity on %d frames: max |logit diff| %.2e, argmax agreement %.4f %%", par["frames"],
             par["max_abs_logit_diff"], 100 * par["argmax_agreement"])
    report["artifacts"]["fp32"] = {"file": paths["fp32"].name, "parity": par}
    for name in made:
        if name == "int8-qad":
            from pipeline.quant import load_qad

            info = quantized_graph(load_qad(qad), paths[name], e, onnx_metadata(model, e, qad), checks,
                                   {"backend": "torch", "qad": str(qad)})
        elif name == "int8" and e.int8_backend == "torch":
            qmodel, quantization = quantize_student(model, e, train_set, val_set, meta.normalization)
            info = quantized_graph(qmodel, paths[name], e, meta, checks, quantization)
        else:
            info = convert(name, paths["fp32"], paths[name], e, train_set, meta.normalization)
        report["artifacts"][name] = {"file": paths[name].name,
                                     "parity": compare(reference, OrtBackend(paths[name], "cpu"), checks), **info}
    for name in report["artifacts"]:
        finalize(paths[name])
    records = score_artifacts(model, e, val_set, report, stage, source)
    _check_budget(report)
    return report, records


def _check_budget(report: dict) -> None:
    """The mixed-precision budget was met on the fake-quantized model; say so where the INT8 graph, scored in ONNX
    Runtime, misses it (the report records that graph's own drop)."""
    arts = report["artifacts"]
    mixed = arts.get("int8", {}).get("quantization", {}).get("mixed_precision")
    if not mixed or "fp32" not in arts:
        return
    mixed["onnx_drop"] = 100 * (arts["fp32"]["miou"] - arts["int8"]["miou"])
    if mixed["onnx_drop"] > mixed["max_drop"]:
        log.warning("export: %s is %.3f mIoU points below %s, over export.int8_max_drop=%g (met by the "
                    "fake-quantized model: %.3f)", arts["int8"]["file"], mixed["onnx_drop"], arts["fp32"]["file"],
                    mixed["max_drop"], mixed["drop"])


def convert(name: str, fp32: Path, dst: Path, e: ExportConfig, train_set, norm: Normalization) -> dict:
    """The FP16 or INT8 variant of the FP32 graph (pipeline/precision.py); returns {"conversion" | "quantization":
    what was done}; precision.py imports modelopt and onnxruntime.quantization only when asked for."""
    if name == "fp16":
        return {"conversion": precision.to_fp16(fp32, dst)}
    calib = graph_inputs(train_set, e.calibration_frames, e, norm)
    log.info("export: INT8 calibration on %d %s frames (%s, %s)", len(calib), train_set.split, e.calibration_method,
             e.int8_backend)
    return {"quantization": precision.to_int8(fp32, dst, np.concatenate(calib), method=e.calibration_method,
                                              backend=e.int8_backend)}


def quantize_student(model: SegFormer, e: ExportConfig, train_set, val_set, norm: Normalization,
                     float_ends: bool = True, bits: int = 8):
    """(the fake-quantized deploy student, what was done): pipeline/quant.py's placement calibrated on
    `export.calibration_frames` training frames; with `export.int8_max_drop` >= 0, the most sensitive groups stay
    float until the fake-quantized student is within that many mIoU points of the FP32 one (pipeline/sensitivity.py).
    `float_ends` and `bits` are quant.quantize's (the qad stage's stress settings)."""
    from pipeline import quant

    qmodel = quant.quantize(model, float_ends=float_ends, bits=bits)
    calib = graph_inputs(train_set, e.calibration_frames, e, norm)
    log.info("export: INT8 calibration on %d %s frames (%s, %s placement)", len(calib), train_set.split,
             e.calibration_method, e.int8_backend)
    quant.calibrate(DeployModel(qmodel, e, fold=False), [torch.from_numpy(x) for x in calib], e.calibration_method)
    info: dict = {"backend": "torch", "method": e.calibration_method, "frames": len(calib), "float_ends": float_ends,
                  "bits": bits}
    if e.int8_max_drop >= 0:
        from pipeline.sensitivity import choose

        choice = choose(qmodel, model, val_set, e.int8_max_drop, size=tuple(e.size), frames=e.eval_frames)
        info["mixed_precision"] = choice.record()
        log.info("export: mixed precision within %.2f mIoU points: %d of %d groups kept in FP16 (%s)",
                 e.int8_max_drop, len(choice.float_groups), len(quant.groups(qmodel)),
                 ", ".join(choice.float_groups) or "none")
    return qmodel.eval(), info


def quantized_graph(qmodel: SegFormer, dst: Path, e: ExportConfig, meta: Metadata, checks: Sequence[np.ndarray],
                    quantization: dict) -> dict:
    """`dst`: the fake-quantized `qmodel` traced to Q/DQ ONNX (its ranges become the scales), everything not INT8
    in FP16 (precision.qdq_to_fp16), and checked against `qmodel` in ONNX Runtime on `checks` (argmax agreement >=
    export.int8_min_agreement); returns {"quantization": what was done, with that parity}."""
    from pipeline import quant

    kind = KINDS["int8-qad" if "qad" in quantization else "int8"]
    traced = dst.with_name(f".{dst.name}.traced.onnx")
    export_onnx(qmodel, traced, e, meta)
    record = {**quantization, "tool": "pipeline.quant (fake quantization traced to Q/DQ)",
              "placement": [list(row) for row in quant.PLACEMENT], "units": len(quant.units(qmodel)),
              "groups": quant.groups(qmodel), "float_groups": quant.float_groups(qmodel),
              "ranges": quant.range_state(qmodel)}
    keep = precision.QDQ_FP32_OPS_LABELS if e.output == "labels" else precision.QDQ_FP32_OPS
    try:
        info = precision.qdq_to_fp16(traced, dst, kind, record, checks[0] if checks else None, keep)
    finally:
        remove(traced)
    fake_quant = TorchBackend(DeployModel(qmodel, e, with_logits=e.output == "labels", fold=False), "cpu",
                              outputs=output_names(e))
    par = compare(fake_quant, OrtBackend(dst, "cpu"), checks)
    if checks and par["argmax_agreement"] < e.int8_min_agreement:
        raise ExportError(f"{dst}: ONNX Runtime disagrees with the fake-quantized PyTorch model on {par['frames']} "
                          f"validation frames (argmax agreement {100 * par['argmax_agreement']:.3f} % < "
                          f"{100 * e.int8_min_agreement:g} %, export.int8_min_agreement; a barely trained student "
                          "has many near-ties); the artifact was removed")
    log.info("export: %s against the fake-quantized model: max |logit diff| %.2e, argmax agreement %.4f %%",
             dst.name, par["max_abs_logit_diff"], 100 * par["argmax_agreement"])
    return {"quantization": {**info, "fake_quant_parity": par}}


def score_artifacts(model: SegFormer, e: ExportConfig, val_set, report: dict, stage: Path,
                    source: Path | None) -> dict[str, Metadata]:
    """The PyTorch student and every finalized artifact in `stage` scored the same way (evaluate.score through a
    Segmenter at the export size); returns each artifact's record with its measurements, by file name."""
    pytorch = Segmenter(TorchBackend(model, "cpu"), checkpoint_metadata(model, str(source or "")),
                        Path(source or "student"), size=tuple(e.size))
    reference = score(pytorch, val_set, e.eval_frames, progress=False)
    frames = len(spread(len(val_set), e.eval_frames))
    log.info("export: scoring PyTorch and %d ONNX artifact(s) on %d %s frames", len(report["artifacts"]), frames,
             val_set.split)
    report["pytorch"] = {"miou": reference.miou, "pixel_acc": reference.pixel_acc}
    report["eval"] = {"dataset": val_set.name, "split": val_set.split, "frames": frames, "resolution": "full label"}
    records = {}
    for entry in report["artifacts"].values():
        seg = Segmenter.open(stage / entry["file"], provider="cpu", size=tuple(e.size))
        res = score(seg, val_set, e.eval_frames, progress=False)
        entry.update(miou=res.miou, pixel_acc=res.pixel_acc, miou_delta_vs_pytorch=res.miou - reference.miou)
        measured = {"parity": entry["parity"], "miou": res.miou, "pixel_acc": res.pixel_acc,
                    "pytorch_miou": reference.miou, "eval": report["eval"]}
        records[entry["file"]] = replace(seg.meta, measured=measured)
    return records


def report_table(report: dict) -> str:
    """The artifacts side by side: parity against PyTorch and mIoU on the validation frames."""
    rows = ["| artifact | max abs logit diff | argmax agreement % | mIoU % | vs PyTorch |", "|---|---:|---:|---:|---:|",
            f"| PyTorch student | - | - | {100 * report['pytorch']['miou']:.2f} | - |"]
    for entry in report["artifacts"].values():
        p = entry["parity"]
        rows.append(f"| {entry['file']} | {p['max_abs_logit_diff']:.2e} | {100 * p['argmax_agreement']:.3f} | "
                    f"{100 * entry['miou']:.2f} | {100 * entry['miou_delta_vs_pytorch']:+.2f} |")
    return "\n".join(rows)
