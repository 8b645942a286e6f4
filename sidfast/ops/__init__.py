"""Fused operators, one file per op: kernels, host functions, custom-op registration and autograd."""
