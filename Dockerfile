# Datacenter-GPU image of the pipeline: distillation, export (ONNX, FP16, INT8 Q/DQ), TensorRT engines and the
# bench report. One CUDA major throughout (13): the base image's CUDA and TensorRT, PyTorch's cu130 wheel and the
# `cu13` GPU set (requirements-gpu-cu13.txt: onnxruntime-gpu and cuda-bindings 13.x; docs/gpu.md). GPUs of compute
# capability 7.5 and newer (T4, A10, A100, L4, L40S, H100, H200, B200); host driver R580 or newer (CUDA 13).
#
# Base: NGC TensorRT 25.12, pinned: TensorRT 10.14.1, CUDA 13.1, Ubuntu 24.04, Python 3.12. The numbers come from
# users of the image (several public build files and benchmark notes say "tensorrt:25.12-py3 (TensorRT 10.14.1,
# CUDA 13.1)"); NVIDIA's 25.12 container notes were not in the docs index here, so the build checks the TensorRT it
# finds. 25.12 rather than 25.10 (TensorRT 10.13.3): every CUDA 13 onnxruntime-gpu (1.27 to 1.31) has a TensorRT
# provider compiled against TensorRT 10.14.1 (requirements-gpu-cu13.txt), and TensorRT keeps minor releases backward
# compatible only. CUDA 13.x runs on R580 and newer (NVIDIA's CUDA Compatibility guide, minor-version compatibility).
# TensorRT's Python bindings are part of the base image: the set's `tensorrt-cu13` line is left out, so pip never
# installs a second TensorRT next to the one the image was built and tested with.
FROM nvcr.io/nvidia/tensorrt:25.12-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The project's packages go into a virtual environment that also sees the base image's site-packages (where
# TensorRT lives): nothing of the base image is upgraded or removed, and pip (upgraded inside the venv) needs no
# --break-system-packages.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv --system-site-packages --upgrade-deps /opt/venv
# DL3008 (apt version pins): python3-venv must be the build that matches the base image's python3, which apt
# picks from the image's own Ubuntu 24.04 sources; a pinned Debian revision breaks with the next security update.

WORKDIR /opt/transkd-deploy
COPY requirements.txt requirements-quant.txt requirements-gpu-cu13.txt ./

# PyTorch 2.13's CUDA builds are 12.6 and 13.0 (stable) and 13.2 (experimental) (pytorch/pytorch RELEASE.md);
# cu130 is the one that matches the base image. torch comes from PyTorch's index alone, everything else from PyPI,
# with torch held to the CUDA build by a constraint so nothing can swap it for PyPI's wheel. ONNX Runtime is
# onnxruntime-gpu from the cu13 set and nothing else (requirements.txt names none): the CPU onnxruntime would
# install over the same `onnxruntime` module.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
 && echo "torch==${TORCH_VERSION}+${TORCH_CUDA}" > constraints.image.txt \
 && sed -E '/^tensorrt(-cu[0-9]+)?[<>=~!; ]/d' requirements-gpu-cu13.txt > requirements.image.txt \
 && pip install --no-cache-dir -c constraints.image.txt -r requirements.txt -r requirements-quant.txt \
        -r requirements.image.txt \
 && rm constraints.image.txt requirements.image.txt \
 && python -c "import importlib.metadata as md, importlib.util as iu, tensorrt; \
torch = md.version('torch'); assert torch.endswith('+${TORCH_CUDA}'), torch; \
trt = tuple(int(x) for x in tensorrt.__version__.split('.')[:3]); \
assert (10, 14, 1) <= trt < (11,), tensorrt.__version__ + ': onnxruntime-gpu needs TensorRT 10.14.1 to 10.x'; \
ort = iu.find_spec('onnxruntime').origin; assert ort.startswith('/opt/venv/'), ort; \
cb = md.version('cuda-bindings'); assert cb.startswith('13.'), 'cuda-bindings ' + cb; \
print('torch', torch, '| tensorrt', tensorrt.__version__, '| onnxruntime-gpu', md.version('onnxruntime-gpu'), \
'| cuda-bindings', cb)"

# the package metadata reads every requirement file pyproject.toml names
COPY pyproject.toml requirements-cpu.txt requirements-gpu-cu12.txt requirements-dev.txt ./
COPY pipeline/ pipeline/
COPY benchmarks/ benchmarks/
COPY trt/ trt/
# The project itself, editable so that the code stays where it was copied (one copy; the console scripts transkd,
# transkd-latency, ... land in the venv); --no-deps: every dependency is installed above, the image's own way.
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "from pipeline.deps import onnxruntime_problem as p; assert p() is None, p()"

# Non-root user; UID/GID 1000 by default so that a host's first user owns what lands in the mounted run folder
# (docker build --build-arg APP_UID=$(id -u) --build-arg APP_GID=$(id -g) for another). Ubuntu 24.04 images
# come with a user `ubuntu` on 1000, which gives way.
ARG APP_UID=1000
ARG APP_GID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid "${APP_GID}" transkd \
 && useradd --uid "${APP_UID}" --gid "${APP_GID}" --create-home --shell /bin/bash transkd \
 && mkdir -p /work/runs /work/data \
 && chown -R transkd:transkd /work
USER ${APP_UID}:${APP_GID}
WORKDIR /work

# Mount the host's runs/ folder on /work/runs (and real datasets under /work/data). The default command exports
# and benchmarks the run in /work/runs/default with that run's own config.yaml: ONNX, FP16 and INT8 Q/DQ ONNX,
# the TensorRT plans (trt-build makes a missing GPU an error instead of a CPU-only report), then report.md.
# Any other stages: docker run ... IMAGE python -m pipeline.run distill export bench
CMD ["python", "-m", "pipeline.run", "export", "trt-build", "bench", \
     "--run-dir", "/work/runs/default", "--config", "/work/runs/default/config.yaml"]
