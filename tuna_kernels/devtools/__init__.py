"""Developer tools, not the public API: the ahead-of-time compile report (``python -m
tuna_kernels.devtools.report``), its roofline model, and the allocation tracker the memory tests and
benchmarks use to prove that no [tokens x vocab] tensor is ever allocated."""
