"""Loss/reward curves drawn with Pillow (no plotting library): one panel per series, stacked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SERIES = (("generator_loss", (220, 80, 60)), ("critic_loss", (60, 120, 220)), ("reward", (40, 160, 80)))


def render_curves(history: Sequence[dict], width: int = 640, panel_height: int = 120) -> np.ndarray:
    """[H, W, 3] uint8 image of the generator loss, critic loss and reward against the step."""
    from PIL import Image, ImageDraw

    height = panel_height * len(SERIES)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    margin_l, margin_r, margin_t, margin_b = 8, 8, 18, 8
    for i, (key, color) in enumerate(SERIES):
        top = i * panel_height
        points = [(r["step"], r[key]) for r in history if r.get(key) is not None and np.isfinite(r[key])]
        draw.rectangle([0, top, width - 1, top + panel_height - 1], outline=(200, 200, 200))
        if not points:
            draw.text((margin_l, top + 2), f"{key}: no data", fill=(120, 120, 120))
            continue
        steps = np.array([p[0] for p in points], dtype=float)
        values = np.array([p[1] for p in points], dtype=float)
        lo, hi = float(values.min()), float(values.max())
        draw.text(
            (margin_l, top + 2), f"{key}  last {values[-1]:.4g}  min {lo:.4g}  max {hi:.4g}", fill=color
        )
        s0, s1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))
        span = hi - lo if hi > lo else 1.0
        xs = margin_l + (steps - s0) / (s1 - s0) * (width - margin_l - margin_r)
        ys = top + panel_height - margin_b - (values - lo) / span * (panel_height - margin_t - margin_b)
        coords = list(zip(xs.tolist(), ys.tolist()))
        if len(coords) == 1:
            x, y = coords[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        else:
            draw.line(coords, fill=color, width=2)
    return np.asarray(img)
