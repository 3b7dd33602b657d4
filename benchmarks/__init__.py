"""Benchmarks behind `alpha-jit bench`: alpha_jit side by side with PyTorch on the same GPU."""
