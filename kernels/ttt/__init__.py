"""TTT layer update (Sun et al. 2024): dual form (`chunk_*`) and the primal reference (`naive_*`)."""

from titanforge.kernels.ttt.chunk import chunk_ttt_linear, chunk_ttt_mlp
from titanforge.kernels.ttt.naive import naive_ttt_linear, naive_ttt_mlp

__all__ = ["chunk_ttt_linear", "chunk_ttt_mlp", "naive_ttt_linear", "naive_ttt_mlp"]
