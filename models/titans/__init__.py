"""Titans (Behrouz, Zhong, Mirrokni 2025): MAC, MAG, MAL and LMM on the neural long-term memory.

Nothing is imported here: `models/config.py` imports `titans.config`, and `titans.model` imports
`models/config.py`, so re-exporting the model would be circular. Build with
`titanforge.models.registry.build_model(cfg)` (family "titans") or `titans.model.build`.
"""
