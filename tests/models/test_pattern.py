"""Layer-pattern parser: Jamba's default layout, custom patterns, clear errors."""

import pytest

from titanforge.models.common.pattern import (
    LayerSpec,
    format_layer_pattern,
    jamba_pattern,
    parse_layer_pattern,
)
from titanforge.models.jamba.config import JambaConfig


@pytest.mark.parametrize("n_layers", [8, 16])
def test_default_jamba_layout(n_layers):
    specs = parse_layer_pattern(JambaConfig().layer_pattern, n_layers)
    assert len(specs) == n_layers
    # Jamba: attention at offset 4 of every 8 layers (1:7), MoE every second layer from offset 1.
    assert [i for i, s in enumerate(specs) if s.mixer == "attention"] == list(range(4, n_layers, 8))
    assert all(s.mixer == "mamba" for i, s in enumerate(specs) if i % 8 != 4)
    assert [i for i, s in enumerate(specs) if s.ffn == "moe"] == list(range(1, n_layers, 2))
    assert all(s.ffn == "mlp" for i, s in enumerate(specs) if i % 2 == 0)


def test_jamba_pattern_builder_matches_default_and_hf_formula():
    assert jamba_pattern() == JambaConfig().layer_pattern
    specs = parse_layer_pattern(jamba_pattern(attn_period=4, attn_offset=1, moe_period=3, moe_offset=2), 24)
    for i, s in enumerate(specs):
        assert (s.mixer == "attention") == (i % 4 == 1)
        assert (s.ffn == "moe") == (i % 3 == 2)


def test_custom_patterns_and_separators():
    specs = parse_layer_pattern("SE|A-,TD\nND", 5)
    assert specs == [LayerSpec("mamba2", "moe"), LayerSpec("attention", "none"), LayerSpec("ttt", "mlp"),
                     LayerSpec("titans", "mlp"), LayerSpec("mamba2", "moe")]
    assert format_layer_pattern(specs[:4]) == "SE A- TD ND"
    # A full-length pattern is used as is; a shorter one repeats and may end mid-block.
    assert [s.mixer for s in parse_layer_pattern("MDADMD", 4)] == ["mamba", "attention", "mamba", "mamba"]


@pytest.mark.parametrize("pattern,n,msg", [
    ("", 8, "empty"),
    ("  | ", 8, "empty"),
    ("MDM", 8, "odd number"),
    ("XD", 2, "mixer letter 'X' is unknown"),
    ("MX", 2, "feed-forward letter 'X' is unknown"),
    ("DM", 2, "swapped"),
    ("MD", 0, "n_layers=0"),
])
def test_bad_patterns(pattern, n, msg):
    with pytest.raises(ValueError, match=msg):
        parse_layer_pattern(pattern, n)


def test_family_restrictions_name_the_layer():
    with pytest.raises(ValueError, match=r"layer 2: mixer 'ttt'.*not supported.*M=mamba"):
        parse_layer_pattern("MD ME TD", 3, allowed_mixers=("mamba", "attention"))
    with pytest.raises(ValueError, match="layer 1: ffn 'none'"):
        parse_layer_pattern("MD A-", 2, allowed_ffns=("mlp", "moe"))


def test_bad_jamba_periods():
    with pytest.raises(ValueError, match="offsets"):
        jamba_pattern(attn_period=4, attn_offset=4)
