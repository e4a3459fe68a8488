"""ROS 2 wiring of the segmentation loop: parameters, subscriptions, publishers, diagnostics; `main` for ros2 run.

The subscription callbacks only queue frames in the loop; its worker thread segments every camera's waiting frame in
one batch and publishes. Statistics go out every `stats_period` seconds both as a diagnostic_msgs/DiagnosticArray on
/diagnostics (one status per camera and one for the loop) and as log lines. A bad parameter or artifact ends the
node the way every entry point of the project ends (pipeline.cli.cli_main): one `error:` line and exit 2, the
traceback with `--debug`. The Segmenter's backend (and with it torch, onnxruntime or tensorrt) is imported only
when the artifact is opened, so the node needs only the packages its artifact runs on.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Callable
from dataclasses import fields

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header
from vision_msgs.msg import LabelInfo, VisionClass

from pipeline.cli import Parser, cli_main
from pipeline.errors import InputError
from transkd_segmentation.params import NodeParams, parameter_error_line
from transkd_segmentation.processing import ERROR, WARN, CameraOutputs, SegmentationLoop, label_info_fields

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


def diagnostic_msg(statuses: list[dict], header: Header) -> DiagnosticArray:
    return DiagnosticArray(header=header, status=[
        DiagnosticStatus(level=LEVELS[f["level"]], name=f["name"], message=f["message"], hardware_id=f["hardware_id"],
                         values=[KeyValue(**v) for v in f["values"]]) for f in statuses])


def _sender(publisher, convert: Callable[[dict], object]) -> Callable[[dict], None]:
    return lambda f: publisher.publish(convert(f))


def open_segmenter(p: NodeParams):
    """Segmenter.open on the artifact, which imports its backend's packages only now (a package the backend needs
    and this Python lacks is one line naming it: pipeline.infer.RUNTIME_PACKAGES)."""
    from pipeline.infer import Segmenter

    return Segmenter.open(p.artifact, **p.open_kwargs())


class SegmentationNode(Node):
    def __init__(self) -> None:
        super().__init__("segmentation_node")
        p = self.params = self._declare_params()
        if not p.artifact:
            raise InputError("parameter artifact is empty: give the TensorRT engine, ONNX file or checkpoint to run")
        self.segmenter = open_segmenter(p)

        # outputs reliable, keep last 1: heard by reliable (rviz2's default) and best-effort subscribers alike
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p.qos_depth,
                            reliability=ReliabilityPolicy.RELIABLE if p.qos_reliable else ReliabilityPolicy.BEST_EFFORT)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        cameras = p.camera_topics()
        outputs = {c.name: CameraOutputs(
            _sender(self.create_publisher(Image, c.mask, out_qos), image_msg),
            _sender(self.create_publisher(Image, c.overlay, out_qos), image_msg) if p.publish_overlay else None,
            _sender(self.create_publisher(CameraInfo, c.camera_info_out, out_qos), camera_info_msg)
            if c.camera_info else None) for c in cameras}
        self.loop = SegmentationLoop(self.segmenter, outputs, clock=lambda: self.get_clock().now().nanoseconds,
                                     log=self.get_logger(), **p.loop_kwargs())

        # the class map once, latched: late subscribers still receive it
        self.label_pub = self.create_publisher(LabelInfo, p.label_info_topic, latched)
        header = Header(stamp=self.get_clock().now().to_msg())
        self.label_pub.publish(label_info_msg(label_info_fields(self.segmenter.classes, header)))

        if p.warmup:
            self.loop.warm_up()
        self.loop.start()
        for c in cameras:
            kind = CompressedImage if c.transport == "compressed" else Image
            self.create_subscription(kind, c.image, lambda m, name=c.name: self.loop.submit(m, name), in_qos)
            if c.camera_info:
                self.create_subscription(CameraInfo, c.camera_info,
                                         lambda m, name=c.name: self.loop.set_camera_info(m, name), in_qos)

        if p.stats_period > 0:
            self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)  # absolute, as ROS expects
            self.create_timer(p.stats_period, self._report)
        d = self.segmenter.describe()
        self.get_logger().info(
            f"{d['artifact']} ({d['backend']} on {d['device']}, {d['precision']}, network {d['size'] or 'frame size'}"
            f", batch {d['batch'] or 'any'}) at {p.output_resolution} resolution, classes on {p.label_info_topic}; "
            + "; ".join(f"{c.name}: {c.transport} {c.image} -> {c.mask}{', ' + c.overlay if p.publish_overlay else ''}"
                        f"{', ' + c.camera_info_out if c.camera_info else ''}" for c in cameras)
            + (f"; synchronised within {p.sync_slop} s (waiting up to {p.sync_timeout} s)" if p.sync_slop > 0 else ""))

    def _declare_params(self) -> NodeParams:
        # read once at start-up, hence read-only: `ros2 param set` is refused instead of silently ignored
        values, defaults = {}, NodeParams.defaults()
        for f in fields(NodeParams):
            default = defaults[f.name]
            descriptor = ParameterDescriptor(description=f.metadata["description"], read_only=True)
            try:
                if isinstance(default, list):
                    # an empty list has no type of its own (rclpy infers a byte array from [], ros2/rclpy#912), and
                    # a parameter declared by type alone is uninitialised on Jazzy (its value raises when read,
                    # ros2/rclpy#1460): the default is [""], a string array, whose empty names are dropped
                    value = self.declare_parameter(f.name, [""], descriptor).value
                    values[f.name] = [v for v in value if v]
                else:
                    values[f.name] = self.declare_parameter(f.name, default, descriptor).value
            except ParameterException as e:  # a wrong type in the params file: rclpy raises while declaring
                raise InputError(parameter_error_line(str(e), f.name)) from None
        return NodeParams.from_values(values)

    def _report(self) -> None:
        report = self.loop.report(self.get_name(), self.segmenter.path.name)
        self.diag_pub.publish(diagnostic_msg(report.statuses, Header(stamp=self.get_clock().now().to_msg())))
        log = self.get_logger()
        for level, line in report.lines:  # rclpy: one severity per call site
            if level == ERROR:
                log.error(line)
            elif level == WARN:
                log.warning(line)
            else:
                log.info(line)

    def close(self) -> None:
        # the worker first: its batch in flight publishes before the publishers go, and nothing after
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
