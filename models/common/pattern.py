"""The layer-pattern description of hybrid stacks, parsed in one place.

A pattern lists the layers of one repeating block, two letters per layer: the token mixer, then
the feed-forward. Whitespace, ',' and '|' between layers are ignored. Layer i of an n-layer model
takes block entry i mod len(block), so a block of 8 describes 8, 16 or 32 layers.

    mixers:       M Mamba-1 (Jamba's)   S Mamba-2 (SSD)   A attention   T TTT   N Titans memory
    feed-forward: D dense SwiGLU        E mixture of experts              - none

Jamba (arXiv 2403.19887): blocks of 8 with attention at offset 4 and MoE every second layer from
offset 1, i.e. "MD ME MD ME AD ME MD ME" (`jamba_pattern()`). Like Megatron's hybrid layer
allocation string, but a layer is a (mixer, feed-forward) pair rather than a separate symbol each.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

MIXERS = {"M": "mamba", "S": "mamba2", "A": "attention", "T": "ttt", "N": "titans"}
FFNS = {"D": "mlp", "E": "moe", "-": "none"}
_SEPARATORS = " \t\n,|"
EXAMPLE = "MD ME MD ME AD ME MD ME"


class LayerSpec(NamedTuple):
    mixer: str  # a value of MIXERS
    ffn: str  # a value of FFNS


def jamba_pattern(attn_period: int = 8, attn_offset: int = 4, moe_period: int = 2, moe_offset: int = 1) -> str:
    """The block string of Jamba's period/offset description (Hugging Face `JambaConfig` fields)."""
    if not (0 <= attn_offset < attn_period and 0 <= moe_offset < moe_period):
        raise ValueError(f"offsets must lie in [0, period): attention {attn_offset}/{attn_period}, "
                         f"MoE {moe_offset}/{moe_period}")
    n = attn_period * moe_period // _gcd(attn_period, moe_period)
    return " ".join(("A" if i % attn_period == attn_offset else "M") + ("E" if i % moe_period == moe_offset else "D")
                    for i in range(n))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def parse_layer_pattern(pattern: str, n_layers: int, allowed_mixers: Iterable[str] | None = None,
                        allowed_ffns: Iterable[str] | None = None) -> list[LayerSpec]:
    """`pattern` (one block, see module docstring) -> one LayerSpec per layer of an `n_layers` model.

    `allowed_mixers` / `allowed_ffns` (names such as "mamba", "moe") restrict what a model family
    builds; anything else raises ValueError naming the layer and the choices.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers} must be >= 1")
    symbols = [ch for ch in pattern if ch not in _SEPARATORS]
    if not symbols:
        raise ValueError(f"layer pattern {pattern!r} is empty; give two letters per layer, e.g. {EXAMPLE!r}")
    if len(symbols) % 2:
        raise ValueError(f"layer pattern {pattern!r} has {len(symbols)} letters, an odd number; each layer "
                         f"takes two, a mixer ({'/'.join(MIXERS)}) then a feed-forward ({'/'.join(FFNS)}), "
                         f"e.g. {EXAMPLE!r}")
    block = []
    for i in range(0, len(symbols), 2):
        m, f = symbols[i], symbols[i + 1]
        where = f"layer {i // 2} of layer pattern {pattern!r}"
        if m not in MIXERS:
            hint = " (mixer and feed-forward swapped?)" if m in FFNS and f in MIXERS else ""
            raise ValueError(f"{where}: mixer letter {m!r} is unknown{hint}; choose one of "
                             + ", ".join(f"{k}={v}" for k, v in MIXERS.items()))
        if f not in FFNS:
            raise ValueError(f"{where}: feed-forward letter {f!r} is unknown; choose one of "
                             + ", ".join(f"{k}={v}" for k, v in FFNS.items()))
        block.append(LayerSpec(MIXERS[m], FFNS[f]))
    specs = [block[i % len(block)] for i in range(n_layers)]
    for kind, allowed, table in (("mixer", allowed_mixers, MIXERS), ("ffn", allowed_ffns, FFNS)):
        if allowed is None:
            continue
        allowed = set(allowed)
        for i, spec in enumerate(specs):
            name = getattr(spec, kind)
            if name not in allowed:
                ok = ", ".join(f"{k}={v}" for k, v in table.items() if v in allowed)
                raise ValueError(f"layer {i}: {kind} {name!r} from layer pattern {pattern!r} is not supported "
                                 f"by this model family; use one of {ok}")
    return specs


def format_layer_pattern(specs: Iterable[LayerSpec]) -> str:
    """Inverse of `parse_layer_pattern` for a full list of layers."""
    m_inv = {v: k for k, v in MIXERS.items()}
    f_inv = {v: k for k, v in FFNS.items()}
    return " ".join(m_inv[s.mixer] + f_inv[s.ffn] for s in specs)
