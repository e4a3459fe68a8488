"""Launch the segmentation node with config/segmentation.yaml; the artifact and the topics can be overridden:

    ros2 launch transkd_segmentation segmentation.launch.py artifact:=/runs/x/student.int8.plan \
        image_topic:=/front/image_raw camera_info_topic:=/front/camera_info

An override left empty keeps the params file's value (so an empty camera_info_topic, which turns the CameraInfo
passthrough off, is set in the params file).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

OVERRIDES = {
    "artifact": "TensorRT engine, ONNX file or checkpoint",
    "image_topic": "camera topic",
    "input_transport": "raw (sensor_msgs/Image) or compressed (CompressedImage on image_topic/compressed)",
    "camera_info_topic": "camera's CameraInfo topic",
    "mask_topic": "mono8 class-id mask",
    "overlay_topic": "rgb8 overlay",
    "label_info_topic": "latched vision_msgs/LabelInfo",
    "camera_info_out_topic": "CameraInfo at the mask's resolution",
    "output_resolution": "camera or network",
}


def _node(context):
    overrides = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    overrides = {name: value for name, value in overrides.items() if value != ""}
    overrides["use_sim_time"] = LaunchConfiguration("use_sim_time").perform(context).lower() == "true"
    return [Node(package="transkd_segmentation", executable="segmentation_node", name="segmentation_node",
                 namespace=LaunchConfiguration("namespace"), output="screen", emulate_tty=True,
                 parameters=[LaunchConfiguration("params_file"), overrides])]


def generate_launch_description() -> LaunchDescription:
    default_params = PathJoinSubstitution([FindPackageShare("transkd_segmentation"), "config", "segmentation.yaml"])
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params, description="node parameters (YAML)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        *(DeclareLaunchArgument(name, default_value="", description=f"{text} (empty: the params file's)")
          for name, text in OVERRIDES.items()),
        OpaqueFunction(function=_node),
    ])
