"""The segmentation node's ROS parameters as one dataclass: names, defaults, meaning and checks, without rclpy."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.config import parse_size as _parse_size
from pipeline.errors import InputError
from pipeline.infer import DTYPES, PROVIDERS, TORCH_MODES
from transkd_segmentation.processing import RESOLUTIONS

TRANSPORTS = ("raw", "compressed")
# the choices Segmenter.open takes, from its registries
CHOICES = {"provider": ("auto", *PROVIDERS), "dtype": tuple(DTYPES), "mode": TORCH_MODES,
           "output_resolution": RESOLUTIONS, "input_transport": TRANSPORTS}


def _param(default, text: str):
    return field(default=default, metadata={"description": text})


@dataclass
class NodeParams:
    """The node's ROS parameters: names, defaults and meaning in one place (config/segmentation.yaml mirrors it)."""

    artifact: str = _param("", "TensorRT engine (.plan/.engine), ONNX (.onnx) or checkpoint that Segmenter.open reads")
    network_size: str = _param("", "HxW network resolution for artifacts without a fixed one (checkpoints, dynamic "
                                   "ONNX); empty: the artifact's own, or the frame's size")
    device: str = _param("auto", "PyTorch device of a checkpoint (auto, cpu, cuda, cuda:N)")
    provider: str = _param("auto", f"ONNX Runtime provider ({', '.join(CHOICES['provider'])})")
    threads: int = _param(0, "ONNX Runtime intra-op threads (0: its default)")
    dtype: str = _param("fp32", f"PyTorch autocast dtype of a checkpoint ({', '.join(CHOICES['dtype'])})")
    mode: str = _param("eager", f"PyTorch mode of a checkpoint ({', '.join(CHOICES['mode'])})")
    deploy: bool = _param(False, "run a checkpoint's reparameterised copy, the graph the export traces")
    warmup: bool = _param(True, "run one blank frame before subscribing, so the first camera frame is not slow")
    image_topic: str = _param("/camera/image_raw", "camera topic (sensor_msgs/Image)")
    input_transport: str = _param("raw", "raw: sensor_msgs/Image on image_topic; compressed: "
                                         "sensor_msgs/CompressedImage (jpeg/png) on image_topic + '/compressed'")
    camera_info_topic: str = _param("/camera/camera_info", "camera's CameraInfo, republished scaled to the mask "
                                                           "(empty: no CameraInfo passthrough)")
    mask_topic: str = _param("/segmentation/mask", "mono8 class-id mask (sensor_msgs/Image), the camera's header")
    overlay_topic: str = _param("/segmentation/overlay", "rgb8 palette overlay (sensor_msgs/Image)")
    label_info_topic: str = _param("/segmentation/label_info", "vision_msgs/LabelInfo class map, latched")
    camera_info_out_topic: str = _param("/segmentation/camera_info", "CameraInfo at the mask's resolution")
    output_resolution: str = _param("camera", "camera: mask at the frame's size; network: at the network size")
    publish_overlay: bool = _param(True, "publish the palette overlay")
    overlay_alpha: float = _param(0.5, "weight of the palette colours in the overlay (1: colours only)")
    qos_reliable: bool = _param(False, "subscribe reliable instead of best effort (best effort also hears "
                                       "reliable publishers; reliable does not hear best-effort ones)")
    qos_depth: int = _param(1, "subscription queue depth (keep last)")
    stats_period: float = _param(5.0, "seconds between diagnostics and statistics log lines (0: off)")
    stats_window: int = _param(300, "frames over which latency percentiles and the rate are computed")

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"parameter {name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise InputError(f"parameter overlay_alpha {self.overlay_alpha}: expected 0..1")
        if self.qos_depth < 1 or self.stats_window < 1 or self.stats_period < 0:
            raise InputError(f"parameters qos_depth {self.qos_depth}, stats_window {self.stats_window} (>= 1) and "
                             f"stats_period {self.stats_period} (>= 0) out of range")
        parse_size(self.network_size)

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        return {f.name: f.metadata["description"] for f in fields(cls)}

    @property
    def input_topic(self) -> str:
        """image_transport's naming: the compressed variant of `camera/image_raw` is `camera/image_raw/compressed`."""
        return self.image_topic.rstrip("/") + "/compressed" if self.input_transport == "compressed" else \
            self.image_topic

    def open_kwargs(self) -> dict[str, Any]:
        """Segmenter.open's keyword arguments."""
        return {"device": self.device, "provider": self.provider, "threads": self.threads, "dtype": self.dtype,
                "mode": self.mode, "deploy": self.deploy, "size": parse_size(self.network_size)}


def parse_size(text: str) -> tuple[int, int] | None:
    """'512x1024' -> (512, 1024); '' -> None (the artifact's own size)."""
    return _parse_size(text, "parameter network_size") if text else None


__all__ = ["CHOICES", "NodeParams", "TRANSPORTS", "parse_size"]
