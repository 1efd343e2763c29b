"""Exact numerics for rewrites: kernel algebra (Dirac, avg-pool and composed kernels)."""
