"""TensorRT engines (need TensorRT and a CUDA GPU; importing this package does not).

`trt.build`: an exported FP16 or Q/DQ INT8 ONNX -> strongly typed engine `<name>.plan` + `<name>.plan.json` sidecar;
`python -m trt.build --help` is its trtexec-like CLI, `tensorrt_unavailable()` says why engines are skipped here.
"""
