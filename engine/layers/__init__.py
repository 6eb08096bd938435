"""Model building blocks, tensor-parallel ready; every op goes through the HAL backend."""
