"""Optional external attention / fused kernels, each behind a `torch.library.custom_op` with a fake
(meta) implementation so that `torch.compile` can trace through it, and each with the pure-PyTorch reference
its test compares against. Availability is detected lazily, never at import."""
