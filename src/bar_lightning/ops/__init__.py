"""Hand-written GPU kernels for work no library covers (each with a pure PyTorch reference it is tested against)."""
