# CPU image of the pipeline as it stands: models, checkpoint import and the FLOPs/speed benchmarks.
# The TensorRT (datacenter GPU) and Jetson images replace this once the export stage exists.
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/transkd-deploy

# torch==2.13.0 from the default index is the CUDA build; the CPU wheel index keeps the image small
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY pipeline/ pipeline/
COPY benchmarks/ benchmarks/
COPY trt/ trt/

CMD ["python", "benchmarks/flops.py", "--model", "mit_b2", "mit_b0", "--size", "512x1024"]
