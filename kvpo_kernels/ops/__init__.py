"""The ops of kvpo_kernels, one module per op (kernels, autograd and registration together)."""
