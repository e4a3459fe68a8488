"""ROS 2 wiring of the segmentation loop: parameters, subscriptions, publishers, diagnostics; `main` for ros2 run.

The subscription callback only puts the frame in the loop's newest-frame slot; the loop's worker thread segments
and publishes. Statistics go out every `stats_period` seconds both as a diagnostic_msgs/DiagnosticArray on
/diagnostics and as one log line. A bad parameter or artifact ends the node the way every entry point of the
project ends (pipeline.cli.cli_main): one `error:` line and exit 2, the traceback with `--debug`.
"""

from __future__ import annotations

import array
import sys
from dataclasses import fields

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header
from vision_msgs.msg import LabelInfo, VisionClass

from pipeline.cli import Parser, cli_main
from pipeline.errors import InputError
from pipeline.infer import Segmenter
from transkd_segmentation.params import NodeParams
from transkd_segmentation.processing import SegmentationLoop, diagnostic_fields, label_info_fields, summary

LEVELS = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR)  # `byte` constants in ROS 2


def _uint8(data) -> array.array:
    # rclpy's generated setter checks every element in Python for anything but an array.array('B') (seconds per
    # camera frame, ros2/rosidl_python#156); frombytes is one memcpy out of the numpy buffer
    out = array.array("B")
    out.frombytes(data)
    return out


def image_msg(f: dict) -> Image:
    return Image(**{**f, "data": _uint8(f["data"])})


def camera_info_msg(f: dict) -> CameraInfo:
    # K, R, P: fixed-size float64 arrays take numpy; D is a sequence, which rclpy wants as array.array('d')
    return CameraInfo(**{**f, "d": array.array("d", f["d"].tolist()), "roi": RegionOfInterest(**f["roi"])})


def label_info_msg(f: dict) -> LabelInfo:
    return LabelInfo(header=f["header"], threshold=f["threshold"],
                     class_map=[VisionClass(**c) for c in f["class_map"]])


def diagnostic_msg(f: dict, header: Header) -> DiagnosticArray:
    status = DiagnosticStatus(level=LEVELS[f["level"]], name=f["name"], message=f["message"],
                              hardware_id=f["hardware_id"], values=[KeyValue(**v) for v in f["values"]])
    return DiagnosticArray(header=header, status=[status])


class SegmentationNode(Node):
    def __init__(self) -> None:
        super().__init__("segmentation_node")
        p = self.params = self._declare_params()
        if not p.artifact:
            raise InputError("parameter artifact is empty: give the TensorRT engine, ONNX file or checkpoint to run")
        self.segmenter = Segmenter.open(p.artifact, **p.open_kwargs())

        # outputs reliable, keep last 1: heard by reliable (rviz2's default) and best-effort subscribers alike
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p.qos_depth,
                            reliability=ReliabilityPolicy.RELIABLE if p.qos_reliable else ReliabilityPolicy.BEST_EFFORT)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        mask_pub = self.create_publisher(Image, p.mask_topic, out_qos)
        overlay_pub = self.create_publisher(Image, p.overlay_topic, out_qos) if p.publish_overlay else None
        info_pub = self.create_publisher(CameraInfo, p.camera_info_out_topic, out_qos) if p.camera_info_topic else None
        self.loop = SegmentationLoop(
            self.segmenter, lambda f: mask_pub.publish(image_msg(f)),
            (lambda f: overlay_pub.publish(image_msg(f))) if overlay_pub else None,
            (lambda f: info_pub.publish(camera_info_msg(f))) if info_pub else None,
            clock=lambda: self.get_clock().now().nanoseconds, output_resolution=p.output_resolution,
            overlay_alpha=p.overlay_alpha, window=p.stats_window, log=self.get_logger())

        # the class map once, latched: late subscribers still receive it
        self.label_pub = self.create_publisher(LabelInfo, p.label_info_topic, latched)
        header = Header(stamp=self.get_clock().now().to_msg())
        self.label_pub.publish(label_info_msg(label_info_fields(self.segmenter.classes, header)))

        if p.warmup:
            self.loop.warm_up()
        self.loop.start()
        kind = CompressedImage if p.input_transport == "compressed" else Image
        self.create_subscription(kind, p.input_topic, self.loop.submit, in_qos)
        if p.camera_info_topic:
            self.create_subscription(CameraInfo, p.camera_info_topic, self.loop.set_camera_info, in_qos)

        self._last: dict | None = None
        if p.stats_period > 0:
            self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            self.create_timer(p.stats_period, self._report)
        d = self.segmenter.describe()
        self.get_logger().info(
            f"{d['artifact']} ({d['backend']} on {d['device']}, {d['precision']}, network {d['size'] or 'frame size'}"
            f"): {kind.__name__} {p.input_topic} -> {p.mask_topic}"
            f"{', ' + p.overlay_topic if overlay_pub else ''}{', ' + p.camera_info_out_topic if info_pub else ''} "
            f"at {p.output_resolution} resolution; classes on {p.label_info_topic}")

    def _declare_params(self) -> NodeParams:
        # read once at start-up, hence read-only: `ros2 param set` is refused instead of silently ignored
        values = {f.name: self.declare_parameter(
            f.name, f.default, ParameterDescriptor(description=f.metadata["description"], read_only=True)).value
            for f in fields(NodeParams)}
        return NodeParams(**values)

    def _report(self) -> None:
        now = self.loop.stats.snapshot()
        f = diagnostic_fields(f"{self.get_name()}: segmentation", self.segmenter.path.name, now, self._last)
        self._last = now
        self.diag_pub.publish(diagnostic_msg(f, Header(stamp=self.get_clock().now().to_msg())))
        self.get_logger().info(summary(now))

    def close(self) -> None:
        self.loop.stop()
        self.destroy_node()


def _spin(ros_args: list[str] | None) -> int:
    rclpy.init(args=ros_args)
    node = None
    try:
        node = SegmentationNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C or the launch system stopping the node: a normal shutdown
    finally:
        if node is not None:
            node.close()
        rclpy.try_shutdown()
    return 0


def main(args: list[str] | None = None) -> None:
    """`ros2 run transkd_segmentation segmentation_node [--debug] --ros-args -p artifact:=...`."""
    parser = Parser(prog="segmentation_node", description="ROS 2 segmentation node; parameters come as --ros-args "
                    "-p name:=value (config/segmentation.yaml lists them)")
    ros_args = sys.argv if args is None else args
    sys.exit(cli_main(parser, lambda _: _spin(ros_args), remove_ros_args(ros_args)[1:]))


if __name__ == "__main__":
    main()
