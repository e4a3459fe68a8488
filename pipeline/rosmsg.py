"""ROS image messages <-> numpy without a ROS installation, shared by the ROS 2 node (ros/) and the bag tools.

Messages are read by attribute, so rclpy's generated classes and rosbags' typestore classes both work; outgoing
messages are described as field dicts (`data` a uint8 numpy array) that the caller turns into its own class.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.errors import InputError

# encoding -> (channels, OpenCV conversion to BGR or None)
ENCODINGS = {
    "bgr8": (3, None),
    "rgb8": (3, cv2.COLOR_RGB2BGR),
    "mono8": (1, cv2.COLOR_GRAY2BGR),
    "bgra8": (4, cv2.COLOR_BGRA2BGR),
    "rgba8": (4, cv2.COLOR_RGBA2BGR),
}
COMPRESSED = ("jpeg", "jpg", "png")
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
# vision_msgs (ROS 2 Humble and later): not in rosbags' built-in type stores, registered from these definitions
VISION_MSGS = {
    "vision_msgs/msg/VisionClass": "uint16 class_id\nstring class_name\n",
    "vision_msgs/msg/LabelInfo": "std_msgs/Header header\nvision_msgs/VisionClass[] class_map\nfloat32 threshold\n",
}


class EncodingError(InputError):
    """An image message this pipeline does not decode (encoding, format or size); the node logs and skips it."""


def _bytes(data) -> np.ndarray:
    try:
        return np.frombuffer(data, np.uint8)  # bytes, array.array('B') (rclpy), numpy (rosbags): no copy
    except (TypeError, ValueError):
        return np.asarray(data, np.uint8)


def image_to_bgr(msg) -> np.ndarray:
    """A sensor_msgs/Image as an H x W x 3 uint8 BGR array (row padding in `step` honoured)."""
    enc = str(msg.encoding).lower()
    if enc not in ENCODINGS:
        raise EncodingError(f"image encoding {msg.encoding!r} is not supported (expected one of "
                            f"{', '.join(ENCODINGS)}, or a CompressedImage in jpeg/png)")
    channels, conversion = ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    raw = _bytes(msg.data)
    if h < 1 or w < 1 or step < w * channels or raw.size < step * h:
        raise EncodingError(f"{enc} image {w}x{h}: step {step} and {raw.size} data bytes do not hold it")
    rows = raw[:step * h].reshape(h, step)[:, :w * channels]
    img = rows.reshape(h, w, channels) if channels > 1 else rows.reshape(h, w)
    return np.ascontiguousarray(img) if conversion is None else cv2.cvtColor(img, conversion)


def compressed_to_bgr(msg) -> np.ndarray:
    """A sensor_msgs/CompressedImage (jpeg or png, as image_transport writes `format`) as BGR uint8."""
    fmt = str(msg.format).lower()
    if not any(k in fmt for k in COMPRESSED):
        raise EncodingError(f"compressed format {msg.format!r} is not supported (expected jpeg or png)")
    img = cv2.imdecode(_bytes(msg.data), cv2.IMREAD_COLOR)
    if img is None:
        raise EncodingError(f"compressed {msg.format!r} image: {len(msg.data)} bytes do not decode")
    return img


def to_bgr(msg) -> np.ndarray:
    """Image or CompressedImage -> BGR uint8; anything else is an EncodingError."""
    if hasattr(msg, "encoding"):
        return image_to_bgr(msg)
    if hasattr(msg, "format"):
        return compressed_to_bgr(msg)
    raise EncodingError(f"{type(msg).__name__}: not an Image or CompressedImage message")


def stamp_ns(header) -> int:
    """A std_msgs/Header's stamp in nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def mask_fields(ids: np.ndarray, header) -> dict:
    """Class ids (H x W uint8) as the fields of a mono8 sensor_msgs/Image with the input's header."""
    ids = np.ascontiguousarray(ids, np.uint8)
    h, w = ids.shape
    return {"header": header, "height": h, "width": w, "encoding": "mono8", "is_bigendian": 0, "step": w,
            "data": ids.reshape(-1)}


def overlay_fields(rgb: np.ndarray, header) -> dict:
    """An H x W x 3 RGB overlay as the fields of an rgb8 sensor_msgs/Image with the input's header."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w, _ = rgb.shape
    return {"header": header, "height": h, "width": w, "encoding": "rgb8", "is_bigendian": 0, "step": 3 * w,
            "data": rgb.reshape(-1)}


def label_info_classes(classes: list[str]) -> list[tuple[int, str]]:
    """(class_id, class_name) pairs of vision_msgs/LabelInfo's class_map: the ids the mask carries."""
    return list(enumerate(classes))
