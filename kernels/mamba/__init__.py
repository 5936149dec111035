"""Mamba-1 selective scan and Mamba-2 SSD: sequential references and chunked PyTorch scans."""

from titanforge.kernels.mamba.chunk import chunk_selective_scan, chunk_ssd
from titanforge.kernels.mamba.naive import naive_selective_scan, naive_ssd

__all__ = ["chunk_selective_scan", "chunk_ssd", "naive_selective_scan", "naive_ssd"]
