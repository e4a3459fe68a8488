# CPU image of the pipeline as it stands: data, training, distillation, evaluation and the benchmarks.
# The TensorRT (datacenter GPU) and Jetson images replace this once the export stage exists.
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/transkd-deploy

# torch==2.13.0 from the default index is the CUDA build; the CPU wheel index keeps the image small
COPY requirements.txt requirements-quant.txt ./
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY pipeline/ pipeline/
COPY benchmarks/ benchmarks/
COPY trt/ trt/

# the main job on the built-in synthetic data; mount a volume on /opt/transkd-deploy/runs to keep the results
CMD ["python", "-m", "pipeline.run", "distill", "export"]
