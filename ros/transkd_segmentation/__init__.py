"""ROS 2 semantic segmentation node around pipeline.infer.Segmenter (processing: no rclpy; node: the wiring)."""
