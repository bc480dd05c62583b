"""Cluster colours that stay apart: chosen once by farthest-point sampling in CIELAB under the
CIEDE2000 colour difference, kept away from the sign colours, the page background and greys."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

POSITIVE, NEGATIVE = "#3b7dd8", "#d84b3b"  # raises / lowers the answer, everywhere in the viewer and figures
BACKGROUND = "#ffffff"
PALETTE_SIZE = 20  # distinct colours; more clusters reuse them with another outline (the viewer says so)
LIGHTNESS = (38.0, 82.0)  # dark enough to read on white, light enough to tell hues apart


def hex_to_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], float) / 255


def rgb_to_hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{round(float(v) * 255):02x}" for v in np.clip(rgb, 0, 1))


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in 0..1 to CIELAB under D65."""
    rgb = np.asarray(rgb, float)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124564, 0.2126729, 0.0193339], [0.3575761, 0.7151522, 0.1191920],
                             [0.1804375, 0.0721750, 0.9503041]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference between CIELAB colours (broadcasting over leading axes)."""
    l1, a1, b1 = np.moveaxis(np.asarray(lab1, float), -1, 0)
    l2, a2, b2 = np.moveaxis(np.asarray(lab2, float), -1, 0)
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean ** 7 / (c_mean ** 7 + 25.0 ** 7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dl, dc = l2 - l1, c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0, dh)
    dhp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    l_mean, cp_mean = (l1 + l2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(c1p * c2p == 0, h_sum,
                      np.where(np.abs(h1p - h2p) <= 180, h_sum / 2,
                               np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)))
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_mean, 1 + 0.015 * cp_mean * t
    r_t = (-2 * np.sqrt(cp_mean ** 7 / (cp_mean ** 7 + 25.0 ** 7))
           * np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2)))))
    return np.sqrt((dl / s_l) ** 2 + (dc / s_c) ** 2 + (dhp / s_h) ** 2 + r_t * (dc / s_c) * (dhp / s_h))


@lru_cache(maxsize=1)
def cluster_palette() -> tuple[str, ...]:
    """PALETTE_SIZE colours, each as far (CIEDE2000) from the sign colours, the background, the greys
    and the colours before it as any sRGB colour on a 1/15 grid can be: deterministic, so one run's
    clusters keep their colours everywhere."""
    steps = np.linspace(0, 1, 16)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    lab = rgb_to_lab(grid)
    readable = (lab[:, 0] >= LIGHTNESS[0]) & (lab[:, 0] <= LIGHTNESS[1])
    grid, lab = grid[readable], lab[readable]
    avoid = [POSITIVE, NEGATIVE, BACKGROUND, "#000000", "#9aa3ad", "#cccccc", "#666666"]
    nearest = np.min([ciede2000(lab, rgb_to_lab(hex_to_rgb(c))) for c in avoid], axis=0)
    chosen = []
    for _ in range(PALETTE_SIZE):
        pick = int(np.argmax(nearest))
        chosen.append(rgb_to_hex(grid[pick]))
        nearest = np.minimum(nearest, ciede2000(lab, lab[pick]))
    return tuple(chosen)


def cluster_color(cluster: int) -> str:
    """A cluster's colour; clusters PALETTE_SIZE apart share one (told apart by their outline)."""
    palette = cluster_palette()
    return palette[cluster % len(palette)]
