"""The segmentation node's ROS parameters as one dataclass: names, defaults, meaning and checks, without rclpy."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from pipeline.config import parse_size as _parse_size
from pipeline.errors import InputError
from pipeline.infer import DTYPES, PROVIDERS, TORCH_MODES
from transkd_segmentation.processing import RESOLUTIONS

TRANSPORTS = ("raw", "compressed")
# the choices Segmenter.open takes, from its registries
CHOICES = {"provider": ("auto", *PROVIDERS), "dtype": tuple(DTYPES), "mode": TORCH_MODES,
           "output_resolution": RESOLUTIONS, "input_transport": TRANSPORTS}
# per camera, the topic parameters resolved under the camera's name
CAMERA_TOPICS = ("image_topic", "camera_info_topic", "mask_topic", "overlay_topic", "camera_info_out_topic")
# ROS parameter types by the annotation of the field; bool is not an integer and an integer is not a double to ROS
ROS_TYPES = {"str": (str, "string"), "int": (int, "integer"), "float": (float, "double"), "bool": (bool, "bool"),
             "list[str]": (list, "string array")}
NAME = re.compile(r"/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")


def _param(default, text: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"description": text})
    return field(default=default, metadata={"description": text})


@dataclass
class NodeParams:
    """The node's ROS parameters: names, defaults and meaning in one place (config/segmentation.yaml mirrors it).
    Topic names are relative, so the node's namespace moves them; /diagnostics stays absolute."""

    artifact: str = _param("", "TensorRT engine (.plan/.engine), ONNX (.onnx) or checkpoint that Segmenter.open reads")
    network_size: str = _param("", "HxW network resolution for artifacts without a fixed one (checkpoints, dynamic "
                                   "ONNX); empty: the artifact's own, or the frame's size")
    device: str = _param("auto", "PyTorch device of a checkpoint (auto, cpu, cuda, cuda:N)")
    provider: str = _param("auto", f"ONNX Runtime provider ({', '.join(CHOICES['provider'])})")
    threads: int = _param(0, "ONNX Runtime intra-op threads (0: its default)")
    dtype: str = _param("fp32", f"PyTorch autocast dtype of a checkpoint ({', '.join(CHOICES['dtype'])})")
    mode: str = _param("eager", f"PyTorch mode of a checkpoint ({', '.join(CHOICES['mode'])})")
    deploy: bool = _param(False, "run a checkpoint's reparameterised copy, the graph the export traces")
    warmup: bool = _param(True, "run one blank batch before subscribing, so the first camera frame is not slow")
    cameras: list[str] = _param([], "camera names: one batch serves them all, each camera's topics are the topic "
                                    "parameters under its name (front/image_raw -> front/segmentation/mask); empty: "
                                    "one camera on the topic parameters as they are")
    camera_transports: list[str] = _param([], "per camera raw or compressed, as many as cameras; empty: "
                                              "input_transport for every camera")
    image_topic: str = _param("image_raw", "camera topic (sensor_msgs/Image)")
    input_transport: str = _param("raw", "raw: sensor_msgs/Image on image_topic; compressed: "
                                         "sensor_msgs/CompressedImage (jpeg/png) on image_topic + '/compressed'")
    camera_info_topic: str = _param("camera_info", "camera's CameraInfo, republished scaled to the mask "
                                                   "(empty: no CameraInfo passthrough)")
    mask_topic: str = _param("segmentation/mask", "mono8 class-id mask (sensor_msgs/Image), the camera's header")
    overlay_topic: str = _param("segmentation/overlay", "rgb8 palette overlay (sensor_msgs/Image)")
    label_info_topic: str = _param("segmentation/label_info", "vision_msgs/LabelInfo class map, latched (one for "
                                                              "all cameras)")
    camera_info_out_topic: str = _param("segmentation/camera_info", "CameraInfo at the mask's resolution")
    output_resolution: str = _param("camera", "camera: mask at the frame's size; network: at the network size")
    publish_overlay: bool = _param(True, "publish the palette overlay")
    overlay_alpha: float = _param(0.5, "weight of the palette colours in the overlay (1: colours only)")
    sync_slop: float = _param(0.0, "seconds: only frames whose stamps lie within it of each other share a batch "
                                   "(0: no synchronisation, every camera's newest frame goes)")
    sync_timeout: float = _param(0.05, "seconds a synchronised batch waits for its missing cameras before it goes "
                                       "without them")
    sync_queue: int = _param(5, "frames per camera kept for synchronisation (the oldest is dropped beyond it)")
    qos_reliable: bool = _param(False, "subscribe reliable instead of best effort (best effort also hears "
                                       "reliable publishers; reliable does not hear best-effort ones)")
    qos_depth: int = _param(1, "subscription queue depth (keep last)")
    stats_period: float = _param(5.0, "seconds between diagnostics and statistics log lines (0: off)")
    stats_window: int = _param(300, "frames (batches) over which latency (compute) percentiles are computed")

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"parameter {name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise InputError(f"parameter overlay_alpha {self.overlay_alpha}: expected 0..1")
        if self.qos_depth < 1 or self.stats_window < 1 or self.stats_period < 0:
            raise InputError(f"parameters qos_depth {self.qos_depth}, stats_window {self.stats_window} (>= 1) and "
                             f"stats_period {self.stats_period} (>= 0) out of range")
        if self.sync_slop < 0 or self.sync_timeout < 0 or self.sync_queue < 1:
            raise InputError(f"parameters sync_slop {self.sync_slop}, sync_timeout {self.sync_timeout} (>= 0) and "
                             f"sync_queue {self.sync_queue} (>= 1) out of range")
        parse_size(self.network_size)
        self._check_cameras()

    def _check_cameras(self) -> None:
        bad = [c for c in self.cameras if not NAME.fullmatch(c)]
        if bad or len(set(self.cameras)) != len(self.cameras):
            raise InputError(f"parameter cameras {self.cameras}: expected distinct ROS names (letters, digits, _ and "
                             f"/, not starting with a digit){', not ' + ', '.join(map(repr, bad)) if bad else ''}")
        if self.camera_transports and len(self.camera_transports) != len(self.cameras):
            raise InputError(f"parameter camera_transports {self.camera_transports}: expected one per camera "
                             f"({len(self.cameras)}) or none")
        for t in self.camera_transports:
            if t not in TRANSPORTS:
                raise InputError(f"parameter camera_transports {t!r}: expected one of {', '.join(TRANSPORTS)}")
        if self.cameras:
            for name in CAMERA_TOPICS:
                if getattr(self, name).startswith("/"):
                    raise InputError(f"parameter {name} {getattr(self, name)!r} is absolute: with cameras it is "
                                     "resolved under each camera's name, give a relative one")

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        return {f.name: f.metadata["description"] for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: _default(f) for f in fields(cls)}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> NodeParams:
        """The parameters from raw values (a params file's `ros__parameters`), each checked for its ROS type as
        rclpy checks an override against the declared default: one line naming the parameter otherwise."""
        known = {f.name: f for f in fields(cls)}
        for name, value in values.items():
            if name not in known:
                close = difflib.get_close_matches(name, known, 1)
                raise InputError(f"parameter {name!r} is not one of the node's" +
                                 (f" (did you mean {close[0]}?)" if close else ""))
            kind, text = ROS_TYPES[str(known[name].type)]
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if ok and kind is list:
                ok = all(isinstance(v, str) for v in value)
            if not ok:
                raise InputError(type_error_line(name, repr(value), _ros_type(value), text))
        return cls(**values)

    def input_topic(self, transport: str | None = None) -> str:
        """image_transport's naming: the compressed variant of `camera/image_raw` is `camera/image_raw/compressed`."""
        return self.image_topic.rstrip("/") + "/compressed" if (transport or self.input_transport) == "compressed" \
            else self.image_topic

    def camera_topics(self) -> list[CameraTopics]:
        """Each camera's topics: the topic parameters as they are for the one camera of an empty `cameras` list,
        else under each camera's name."""
        if not self.cameras:
            return [CameraTopics("camera", self.input_transport, self.input_topic(), self.camera_info_topic,
                                 self.mask_topic, self.overlay_topic, self.camera_info_out_topic)]
        transports = self.camera_transports or [self.input_transport] * len(self.cameras)

        def under(camera: str, topic: str) -> str:
            return f"{camera.rstrip('/')}/{topic}" if topic else ""

        return [CameraTopics(c, t, under(c, self.input_topic(t)), under(c, self.camera_info_topic),
                             under(c, self.mask_topic), under(c, self.overlay_topic),
                             under(c, self.camera_info_out_topic)) for c, t in zip(self.cameras, transports)]

    def open_kwargs(self) -> dict[str, Any]:
        """Segmenter.open's keyword arguments."""
        return {"device": self.device, "provider": self.provider, "threads": self.threads, "dtype": self.dtype,
                "mode": self.mode, "deploy": self.deploy, "size": parse_size(self.network_size)}

    def loop_kwargs(self) -> dict[str, Any]:
        """SegmentationLoop's keyword arguments."""
        return {"output_resolution": self.output_resolution, "overlay_alpha": self.overlay_alpha,
                "window": self.stats_window, "sync_slop": self.sync_slop, "sync_timeout": self.sync_timeout,
                "sync_queue": self.sync_queue}


@dataclass(frozen=True)
class CameraTopics:
    """One camera's name, input transport and topics (camera_info empty: no CameraInfo passthrough)."""

    name: str
    transport: str
    image: str
    camera_info: str
    mask: str
    overlay: str
    camera_info_out: str


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _ros_type(value) -> str:
    for kind, name in ((bool, "bool"), (int, "integer"), (float, "double"), (str, "string"), (list, "array")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def type_error_line(name: str, value: str, given: str, expected: str) -> str:
    """One line for a parameter of the wrong ROS type."""
    given, expected = given.lower().replace("_", " "), expected.lower().replace("_", " ")
    hint = " (ROS parameter types are strict: write 5.0 for a double, not 5)" if expected == "double" else ""
    return f"parameter {name}: {value} ({given}) given, expected {expected}{hint}"


# rclpy's InvalidParameterTypeException (Humble and later): the override's value and type, the declared type
_RCLPY_TYPE = re.compile(r"Trying to set parameter '(?P<name>[^']+)' to '(?P<value>.*)' of type '(?P<given>\w+)', "
                         r"expecting type '(?:Type\.)?(?P<expected>\w+)'", re.S)


def parameter_error_line(message: str, name: str) -> str:
    """One line for rclpy's refusal of parameter `name` while declaring it (ParameterException's message): the
    value, the type given and the type expected where it is a type error, else its first line."""
    m = _RCLPY_TYPE.search(message)
    if m:
        return type_error_line(m["name"], repr(m["value"]), m["given"], m["expected"])
    first = (message.strip().splitlines() or ["refused"])[0]
    return f"parameter {name}: {first}"


def parse_size(text: str) -> tuple[int, int] | None:
    """'512x1024' -> (512, 1024); '' -> None (the artifact's own size)."""
    return _parse_size(text, "parameter network_size") if text else None


__all__ = ["CAMERA_TOPICS", "CHOICES", "CameraTopics", "NodeParams", "TRANSPORTS", "parameter_error_line",
           "parse_size", "type_error_line"]
