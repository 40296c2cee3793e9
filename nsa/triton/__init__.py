"""The Triton backend. `backend` adapts the public layout to the kernel families (banded, select,
selected, gate, fused, decode), each a file holding its kernels, launchers, custom ops, fakes and
autograd; `utils` the jit helpers, `launch` what launchers derive from inputs, `tuning` every
launch shape."""
