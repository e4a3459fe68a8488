"""ament_python build of the transkd_segmentation ROS 2 package (colcon build --packages-select ...)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "transkd_segmentation"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="transkd-deploy maintainers",
    maintainer_email="maintainers@users.noreply.r-seed-0bc54f37.example",
    description="ROS 2 semantic segmentation node around the transkd-deploy Segmenter",
    license="Proprietary",  # the repository declares no open-source licence
    entry_points={"console_scripts": [f"segmentation_node = {PACKAGE}.node:main"]},
)
