"""Triton kernels, one per file, plus their shared tile helpers (common.py), launch configurations
(configs.py) and launchers (launch.py). Nothing here is public: use :mod:`tuna_kernels.api`."""
