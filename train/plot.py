"""Line charts as PNG with Pillow only (no matplotlib in the base install): loss curves for the demo reports."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def _fmt(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e7:
        return str(int(v))
    return f"{v:.3g}"


def line_chart(path: str, series: Mapping[str, Sequence[tuple[float, float]]], title: str = "",
               width: int = 560, height: int = 280, log_y: bool = False) -> str:
    """Draw each series (name -> [(x, y), ...], x increasing) as a polyline on shared axes and save a PNG at
    ``path``; returns the path. Non-finite points are skipped; ``log_y`` plots log10(y) (y > 0 only)."""
    pts = {}
    for name, s in series.items():
        keep = [(float(x), float(y)) for x, y in s if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
        pts[name] = [(x, math.log10(y) if log_y else y) for x, y in keep]
    allp = [p for s in pts.values() for p in s]
    if not allp:
        raise ValueError(f"line_chart: no finite points to draw in {list(series)}")
    x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
    y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    for frac in (0.0, 0.5, 1.0):  # y ticks
        y = y0 + frac * (y1 - y0)
        py = to_px(x0, y)[1]
        d.line([left - 4, py, left, py], fill=(100, 100, 100))
        d.text((2, py - 6), _fmt(10 ** y if log_y else y), fill=(60, 60, 60))
    for frac in (0.0, 0.5, 1.0):  # x ticks
        x = x0 + frac * (x1 - x0)
        px = to_px(x, y0)[0]
        d.line([px, bottom, px, bottom + 4], fill=(100, 100, 100))
        label = _fmt(round(x) if x1 - x0 >= 10 else x)
        d.text((min(px - 3 * len(label), right - 6 * len(label)), bottom + 8), label, fill=(60, 60, 60))
    d.text((left, 6), title + ("  (log scale)" if log_y else ""), fill=(0, 0, 0))
    for i, (name, s) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        if len(s) > 1:
            d.line([to_px(x, y) for x, y in s], fill=color, width=2)
        elif s:
            px, py = to_px(*s[0])
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        d.text((right - 150, top + 4 + 12 * i), name, fill=color)
    img.save(path)
    return path
