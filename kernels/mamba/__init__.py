"""Mamba-1 selective scan, Mamba-2 SSD and the short causal conv: sequential references, PyTorch
scans and the fused C loops for CPU."""

from titanforge.kernels.mamba.chunk import chunk_selective_scan, chunk_ssd
from titanforge.kernels.mamba.conv import causal_conv1d, causal_conv1d_silu
from titanforge.kernels.mamba.naive import naive_selective_scan, naive_ssd

__all__ = ["causal_conv1d", "causal_conv1d_silu", "chunk_selective_scan", "chunk_ssd", "naive_selective_scan", "naive_ssd"]
