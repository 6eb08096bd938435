"""Triton kernels written once for the GPU backends (cuda, rocm), each runnable on CPU tensors
under TRITON_INTERPRET=1. Import the kernel modules lazily (`backends.triton.attention`, ...):
importing this package loads neither Triton nor a kernel."""
