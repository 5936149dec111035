"""TTT-Linear / TTT-MLP language models (Sun et al. 2024, arXiv 2407.04620).

The model lives in `titanforge.models.ttt.model` (build, TTTModel, TTTBlock) and the layer in
`titanforge.models.ttt.layer` (TTTLayer, CausalConv); they are not imported here because
models/config.py imports this package's config while models are still being defined.
"""
