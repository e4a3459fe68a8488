"""Launch the segmentation node with config/segmentation.yaml; the artifact, the cameras and the topics can be
overridden, and `namespace` moves every topic (they are relative; /diagnostics stays absolute):

    ros2 launch transkd_segmentation segmentation.launch.py artifact:=/runs/x/student.int8.plan namespace:=front
    ros2 launch transkd_segmentation segmentation.launch.py artifact:=/runs/x/student.b4.plan \
        cameras:=front,left,right,rear sync_slop:=0.01

An override left empty keeps the params file's value (so an empty camera_info_topic, which turns the CameraInfo
passthrough off, is set in the params file). `cameras` and `camera_transports` take comma-separated names.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

OVERRIDES = {
    "artifact": "TensorRT engine, ONNX file or checkpoint",
    "cameras": "comma-separated camera names; each camera's topics go under its name",
    "camera_transports": "comma-separated raw or compressed, one per camera",
    "image_topic": "camera topic",
    "input_transport": "raw (sensor_msgs/Image) or compressed (CompressedImage on image_topic/compressed)",
    "camera_info_topic": "camera's CameraInfo topic",
    "mask_topic": "mono8 class-id mask",
    "overlay_topic": "rgb8 overlay",
    "label_info_topic": "latched vision_msgs/LabelInfo",
    "camera_info_out_topic": "CameraInfo at the mask's resolution",
    "output_resolution": "camera or network",
    "sync_slop": "seconds within which stamps share a batch (0.0: no synchronisation)",
}
LISTS = ("cameras", "camera_transports")  # string arrays: given as comma-separated text
FLOATS = ("sync_slop",)


def _value(name: str, text: str):
    if name in LISTS:
        return [part.strip() for part in text.split(",") if part.strip()]
    return float(text) if name in FLOATS else text


def _node(context):
    overrides = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    overrides = {name: _value(name, value) for name, value in overrides.items() if value != ""}
    overrides["use_sim_time"] = LaunchConfiguration("use_sim_time").perform(context).lower() == "true"
    return [Node(package="transkd_segmentation", executable="segmentation_node", name="segmentation_node",
                 namespace=LaunchConfiguration("namespace"), output="screen", emulate_tty=True,
                 parameters=[LaunchConfiguration("params_file"), overrides])]


def generate_launch_description() -> LaunchDescription:
    default_params = PathJoinSubstitution([FindPackageShare("transkd_segmentation"), "config", "segmentation.yaml"])
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="node parameters (YAML; config/multicam.yaml for several cameras)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        *(DeclareLaunchArgument(name, default_value="", description=f"{text} (empty: the params file's)")
          for name, text in OVERRIDES.items()),
        OpaqueFunction(function=_node),
    ])
