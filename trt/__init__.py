"""TensorRT engine building and runtime (filled by the export and benchmark work; needs a GPU)."""
