"""Where tensors run: the device seam (CUDA, mixed precision, torchrun) and CPU process
settings."""
