"""A PNG heat map (rows x columns of accuracies in [0, 1]) written with numpy and zlib only.

The environment has neither matplotlib nor PIL, so the image is drawn here: one colored cell per
value (viridis-like ramp, grey for no data), each cell labelled with its percentage in a 3x5
pixel font, row labels (sequence lengths) on the left and column labels (depth in percent) on
top. `png_bytes(rgb)` is the minimal PNG encoder (8-bit RGB, one IDAT chunk).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# 3x5 digits, rows top to bottom, 3 bits a row (MSB left).
_FONT = {"0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
         "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
         "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), "-": (0, 0, 7, 0, 0)}
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG file bytes."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _color(v: float) -> np.ndarray:
    if not np.isfinite(v):
        return np.array([160, 160, 160], dtype=np.uint8)
    x = min(1.0, max(0.0, v)) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    return np.round(_RAMP[i] + (x - i) * (_RAMP[i + 1] - _RAMP[i])).astype(np.uint8)


def _text(img: np.ndarray, s: str, y: int, x: int, scale: int, color) -> None:
    for ch in s:
        rows = _FONT.get(ch)
        if rows is not None:
            for r, bits in enumerate(rows):
                for c in range(3):
                    if bits >> (2 - c) & 1:
                        img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def heatmap(values: np.ndarray, row_labels: list[str], col_labels: list[str], cell: int = 40) -> np.ndarray:
    """uint8 [H, W, 3] image of `values` [rows, cols] (NaN = no data)."""
    rows, cols = values.shape
    scale = max(1, cell // 16)
    left, top = 6 * 4 * scale + 8, 5 * scale + 10
    img = np.full((top + rows * cell + 4, left + cols * cell + 4, 3), 255, dtype=np.uint8)
    for j, lab in enumerate(col_labels):
        _text(img, lab, 4, left + j * cell + 4, scale, (0, 0, 0))
    for i, lab in enumerate(row_labels):
        y = top + i * cell
        _text(img, lab, y + (cell - 5 * scale) // 2, 4, scale, (0, 0, 0))
        for j in range(cols):
            v = values[i, j]
            x = left + j * cell
            img[y + 1:y + cell - 1, x + 1:x + cell - 1] = _color(v)
            ink = (0, 0, 0) if np.isfinite(v) and v > 0.55 else (255, 255, 255)
            _text(img, "-" if not np.isfinite(v) else str(int(round(100 * v))), y + (cell - 5 * scale) // 2,
                  x + 4, scale, ink)
    return img


def write_heatmap(path: str | Path, values: np.ndarray, row_labels: list[str], col_labels: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(heatmap(np.asarray(values, dtype=np.float64), row_labels, col_labels)))
    return path
