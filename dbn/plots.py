"""Dependency-free pictures: a minimal PNG writer, RBM filter grids and
learning curves rasterised with numpy (no matplotlib).

* :func:`write_png` -- 8-bit grayscale ``[h, w]`` or RGB ``[h, w, 3]`` uint8.
* :func:`filter_grid_png` -- first-layer weights ``W [784, n_hidden]`` tiled as
  28x28 images, each normalised to its own min..max.
* :func:`learning_curves_png` -- line plots of named series against the
  epoch (0-based index) with axes, tick marks, labels in a 3x5 pixel font and
  a legend.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from typing import Mapping, Sequence

import numpy as np

__all__ = ["write_png", "read_png", "filter_grid", "filter_grid_png", "learning_curves_png",
           "COLORS"]

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write ``img`` uint8 ``[h, w]`` (grayscale) or ``[h, w, 3]`` (RGB) as PNG."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 2:
        color_type, channels = 0, 1
    elif img.ndim == 3 and img.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"expected [h, w] or [h, w, 3], got shape {img.shape}")
    h, w = img.shape[:2]
    rows = np.zeros((h, 1 + w * channels), np.uint8)  # filter byte 0 (None) per row
    rows[:, 1:] = img.reshape(h, w * channels)
    png = (_PNG_SIG
           + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
           + _chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read back a PNG written by :func:`write_png` (8-bit, filter 0 only)."""
    data = open(path, "rb").read()
    if data[:8] != _PNG_SIG:
        raise ValueError(f"{path}: not a PNG")
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ValueError(f"{path}: bad CRC in {kind!r} at byte {pos}")
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ct = ihdr[:4]
    ch = {0: 1, 2: 3}[ct]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * ch)
    if rows[:, 0].any():
        raise ValueError(f"{path}: only filter type 0 is supported")
    img = rows[:, 1:].reshape(h, w, ch)
    return img[:, :, 0] if ch == 1 else img


# ------------------------------------------------------------------- filters


def filter_grid(W: np.ndarray, shape: tuple[int, int] = (28, 28), max_filters: int = 100,
                border: int = 1, scale: int = 2) -> np.ndarray:
    """Tile the first ``max_filters`` columns of ``W [prod(shape), n]`` into a
    uint8 grayscale image; each filter is scaled to its own min..max,
    separated by ``border`` black pixels, and enlarged ``scale`` times."""
    W = np.asarray(W, np.float64)
    n = min(W.shape[1], max_filters)
    if W.shape[0] != shape[0] * shape[1]:
        raise ValueError(f"W has {W.shape[0]} rows, shape {shape} needs {shape[0] * shape[1]}")
    f = W[:, :n].T.reshape(n, *shape)
    lo = f.min(axis=(1, 2), keepdims=True)
    hi = f.max(axis=(1, 2), keepdims=True)
    f = (f - lo) / np.where(hi > lo, hi - lo, 1.0)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    th, tw = shape[0] + border, shape[1] + border
    img = np.zeros((rows * th + border, cols * tw + border), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        img[border + r * th:border + r * th + shape[0], border + c * tw:border + c * tw + shape[1]] = \
            np.round(f[i] * 255).astype(np.uint8)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return img


def filter_grid_png(W: np.ndarray, path: str | os.PathLike, shape: tuple[int, int] = (28, 28),
                    max_filters: int = 100, scale: int = 2) -> None:
    """Write :func:`filter_grid` of ``W [784, n_hidden]`` as a grayscale PNG."""
    write_png(path, filter_grid(W, shape, max_filters, scale=scale))


# ------------------------------------------------------------ line plots

#: 3x5 pixel glyphs, rows top to bottom, 3 bits each (MSB = left pixel)
_FONT_ROWS = {
    "A": "010 101 111 101 101", "B": "110 101 110 101 110", "C": "011 100 100 100 011",
    "D": "110 101 101 101 110", "E": "111 100 110 100 111", "F": "111 100 110 100 100",
    "G": "011 100 101 101 011", "H": "101 101 111 101 101", "I": "111 010 010 010 111",
    "J": "001 001 001 101 010", "K": "101 101 110 101 101", "L": "100 100 100 100 111",
    "M": "101 111 111 101 101", "N": "110 101 101 101 101", "O": "010 101 101 101 010",
    "P": "110 101 110 100 100", "Q": "010 101 101 110 011", "R": "110 101 110 101 101",
    "S": "011 100 010 001 110", "T": "111 010 010 010 010", "U": "101 101 101 101 111",
    "V": "101 101 101 010 010", "W": "101 101 111 111 101", "X": "101 101 010 101 101",
    "Y": "101 101 010 010 010", "Z": "111 001 010 100 111",
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "110 001 010 100 111",
    "3": "110 001 010 001 110", "4": "101 101 111 001 001", "5": "111 100 110 001 110",
    "6": "011 100 111 101 111", "7": "111 001 010 010 010", "8": "111 101 111 101 111",
    "9": "111 101 111 001 110", ".": "000 000 000 000 010", "-": "000 000 111 000 000",
    "_": "000 000 000 000 111", ":": "000 010 000 010 000", "/": "001 001 010 100 100",
    "%": "101 001 010 100 101", "(": "010 100 100 100 010", ")": "010 001 001 001 010",
    "=": "000 111 000 111 000", "+": "000 010 111 010 000", ",": "000 000 000 010 100",
    " ": "000 000 000 000 000", "?": "110 001 010 000 010",
}
_FONT = {ch: np.array([[c == "1" for c in row] for row in spec.split()], bool)
         for ch, spec in _FONT_ROWS.items()}

#: line colours (RGB), cycled over the series
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14),
          (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def _text(img: np.ndarray, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 1) -> None:
    """Draw ``s`` with its top-left corner at (x, y); clipped to the image."""
    h, w = img.shape[:2]
    for ch in s.upper():
        g = np.repeat(np.repeat(_FONT.get(ch, _FONT["?"]), scale, 0), scale, 1)
        ys, xs = np.nonzero(g)
        ys, xs = ys + y, xs + x
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        img[ys[ok], xs[ok]] = color
        x += 4 * scale


def _text_width(s: str, scale: int = 1) -> int:
    return max(len(s) * 4 * scale - scale, 0)


def _line(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    """Bresenham line from (x0, y0) to (x1, y1), clipped to the image."""
    h, w = img.shape[:2]
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        if 0 <= x0 < w and 0 <= y0 < h:
            img[y0, x0] = color
        if x0 == x1 and y0 == y1:
            break
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}".replace("e-0", "e-").replace("e+0", "e")


def learning_curves_png(series: Mapping[str, Sequence[float]], path: str | os.PathLike,
                        title: str = "", size: tuple[int, int] = (640, 400),
                        xlabel: str = "epoch") -> None:
    """Plot each named series (value per epoch, x = 0, 1, ...) as a coloured
    polyline with axes, tick labels, ``title`` and a legend; write RGB PNG."""
    W, H = size
    img = np.full((H, W, 3), 255, np.uint8)
    names = list(series)
    legend_w = max([_text_width(n) for n in names] + [0]) + 20
    left, right, top, bottom = 48, 12 + legend_w, 22, 28
    x0, x1, y0, y1 = left, W - right, H - bottom, top  # plot box (y grows down)
    vals = [float(v) for s in series.values() for v in s if np.isfinite(v)]
    n_max = max([len(s) for s in series.values()] + [1])
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    xmax = max(n_max - 1, 1)

    def px(i: float) -> int:
        return int(round(x0 + (x1 - x0) * i / xmax))

    def py(v: float) -> int:
        return int(round(y0 - (y0 - y1) * (v - lo) / (hi - lo)))

    black, grey = (0, 0, 0), (225, 225, 225)
    for t in _nice_ticks(lo, hi):
        yy = py(t)
        _line(img, x0 + 1, yy, x1, yy, grey)
        _line(img, x0 - 4, yy, x0, yy, black)
        s = _fmt(t)
        _text(img, x0 - 6 - _text_width(s), yy - 2, s)
    for t in _nice_ticks(0, xmax, min(10, xmax)):
        if abs(t - round(t)) > 1e-9:
            continue
        xx = px(t)
        _line(img, xx, y0, xx, y0 + 4, black)
        s = str(int(round(t)))
        _text(img, xx - _text_width(s) // 2, y0 + 7, s)
    _line(img, x0, y0, x1, y0, black)
    _line(img, x0, y0, x0, y1, black)
    _text(img, (x0 + x1 - _text_width(xlabel)) // 2, H - 9, xlabel)
    if title:
        _text(img, (W - _text_width(title, 2)) // 2, 4, title, scale=2)
    for k, name in enumerate(names):
        color = COLORS[k % len(COLORS)]
        pts = [(px(i), py(v)) for i, v in enumerate(series[name]) if np.isfinite(v)]
        for (a, b), (c, d) in zip(pts, pts[1:]):
            _line(img, a, b, c, d, color)
        for a, b in pts:  # small markers
            img[max(b - 1, 0):b + 2, max(a - 1, 0):a + 2] = color
        ly = top + 4 + 12 * k
        img[ly:ly + 7, x1 + 10:x1 + 17] = color
        _text(img, x1 + 21, ly + 1, name)
    write_png(path, img)
