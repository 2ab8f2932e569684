"""The ops of kvpo_kernels, one module per op: checks, the torch and cpp backends, the custom-op
registration and autograd. Triton kernels live in :mod:`kvpo_kernels.ops.triton`, one module per op
that has them, imported on first use."""
