"""The artifact table and the one metadata record: golden files pin the schema, the reader refuses what differs."""

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.artifacts import ARTIFACTS, Metadata, read_sidecar, run_file, save, sidecar_path
from pipeline.errors import InputError
from pipeline.models import build_model, save_model

GOLDEN = Path(__file__).parent / "golden"


def shape(value):
    """The key tree of a JSON value: objects by key, lists by their first item, scalars by JSON type."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def golden(kind: str) -> dict:
    return json.loads((GOLDEN / f"{kind}.json").read_text())


def golden_kinds() -> list[str]:
    return sorted(p.stem for p in GOLDEN.glob("*.json"))


def test_every_golden_record_reads_back_unchanged():
    assert {"checkpoint", "onnx", "plan-int8"} <= set(golden_kinds())
    for kind in golden_kinds():
        data = golden(kind)
        assert data["kind"] == kind
        assert Metadata.from_dict(data, kind).to_dict() == data


def test_save_model_writes_the_golden_checkpoint_schema(tmp_path):
    model = build_model("mit_b0")
    save_model(model, tmp_path / "student.safetensors", extra={"step": 3, "val_miou": 0.5, "dataset": "synthetic",
                                                               "method": "none"})
    written = json.loads(sidecar_path(tmp_path / "student.safetensors").read_text())
    assert shape(written) == shape(golden("checkpoint"))
    meta = read_sidecar(tmp_path / "student.safetensors", verify=True)
    assert meta.file == "student.safetensors" and meta.bytes == (tmp_path / "student.safetensors").stat().st_size


def _paths(value, prefix=""):
    """Dotted paths of every object field, deepest last."""
    for k, v in value.items():
        yield prefix + k
        if isinstance(v, dict) and k not in ("versions", "measured", "details"):
            yield from _paths(v, prefix + k + ".")


@pytest.mark.parametrize("kind", ["checkpoint", "onnx", "plan-int8"])
def test_a_missing_or_mistyped_field_is_one_line_naming_it(kind):
    data = golden(kind)
    optional = {f.name for f in dataclasses.fields(Metadata) if f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING}
    optional |= {"normalization.space", "normalization.inside_graph", "contract.input_name", "contract.output_size"}
    for path in _paths(data):
        if path in optional:
            continue
        broken = json.loads(json.dumps(data))
        *parents, leaf = path.split(".")
        node = broken
        for p in parents:
            node = node[p]
        del node[leaf]
        with pytest.raises(InputError, match=rf"^f\.json: field '{path}' missing$"):
            Metadata.from_dict(broken, "f.json")
    for path, value, expected in (("classes", "road", "a list"), ("num_classes", "19", "an integer"),
                                  ("normalization.mean", [1, "2", 3], "a number"), ("contract.dynamic", 1,
                                                                                    "true/false")):
        broken = json.loads(json.dumps(data))
        *parents, leaf = path.split(".")
        node = broken
        for p in parents:
            node = node[p]
        node[leaf] = value
        with pytest.raises(InputError, match=rf"^f\.json: field '{path}(\[\d\])?': expected {expected}"):
            Metadata.from_dict(broken, "f.json")


def test_records_of_another_schema_version_kind_or_layout_are_refused():
    data = golden("checkpoint")
    for change, message in ((dict(schema="transkd-deploy/segformer"), "field 'schema'"),
                            (dict(schema_version=2), "field 'schema_version' is 2"),
                            (dict(kind="tflite"), "field 'kind' is 'tflite'"),
                            (dict(classes=data["classes"][:3]), "field 'classes': expected 19 names"),
                            (dict(details={}), "field 'details.config' missing")):
        with pytest.raises(InputError, match=message):
            Metadata.from_dict({**data, **change}, "f.json")
    with pytest.raises(InputError, match="expected a JSON object"):
        Metadata.from_dict([data], "f.json")


def test_the_table_names_every_run_directory_file():
    assert run_file("checkpoint") == "student.safetensors"
    assert run_file("checkpoint", "teacher") == "teacher.safetensors"
    assert run_file("checkpoint-qad") == "student.qad.safetensors"
    assert [run_file(k) for k in artifacts.kinds("onnx")] == ["student.onnx", "student.fp16.onnx", "student.int8.onnx",
                                                             "student.int8-qad.onnx"]
    assert [run_file(k) for k in artifacts.kinds("tensorrt")] == ["student.fp16.plan", "student.int8.plan",
                                                                 "student.int8-qad.plan"]
    # each engine kind is built from one ONNX kind, and the FP32 graph builds none
    assert [artifacts.plan_kind(k) for k in artifacts.kinds("onnx")] == [None, "plan-fp16", "plan-int8",
                                                                        "plan-int8-qad"]
    for kind in ARTIFACTS.values():
        assert kind.source in ("", *ARTIFACTS), kind.name
        assert kind.precision in artifacts.PRECISIONS
    assert sidecar_path("runs/x/student.int8.plan") == Path("runs/x/student.int8.plan.json")


def test_save_publishes_the_artifact_then_its_sidecar_and_leaves_nothing_on_failure(tmp_path):
    meta = Metadata.from_dict(golden("checkpoint"), "golden")
    written = save(tmp_path / "a.safetensors", lambda p: p.write_bytes(b"weights"), meta)
    assert written.bytes == 7 and read_sidecar(tmp_path / "a.safetensors", verify=True).sha256 == written.sha256

    def fail(p: Path) -> None:
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save(tmp_path / "b.safetensors", fail, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.json"]
    (tmp_path / "a.safetensors").write_bytes(b"other")
    with pytest.raises(InputError, match="sha256 differs"):
        read_sidecar(tmp_path / "a.safetensors", verify=True)
    with pytest.raises(InputError, match=r"c\.onnx\.json: missing"):
        read_sidecar(tmp_path / "c.onnx")
