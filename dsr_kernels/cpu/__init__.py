"""Python launchers of the compiled C++ CPU kernels (``backend="cpu"``): csrc/cpu/."""
