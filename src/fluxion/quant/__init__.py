"""Quantized Linear layers as module swaps (house style P9): fp8 rowwise (fast on Hopper), int8 / int4
weight-only (memory). Each layer has `from_float()` and a dequantized reference."""
