"""The class colours: one palette for label images (napari), thumbnails and GeoJSON (QuPath).

Class 0 is background: transparent in label layers and left uncoloured in overlays. Classes
1.. take a Tab10-like qualitative palette in order, repeating after ten.
"""

from __future__ import annotations

__all__ = ["class_color", "class_colors"]

# Tab10-like: distinct for the first ten classes, readable on white and on H&E pink.
_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def class_color(index: int) -> tuple[int, int, int]:
    """RGB of class ``index`` (class 0, background, is black: draw it transparent).

    >>> class_color(0), class_color(1), class_color(11) == class_color(1)
    ((0, 0, 0), (31, 119, 180), True)
    """
    if index < 0:
        raise ValueError(f"class index must be >= 0, got {index}")
    return (0, 0, 0) if index == 0 else _PALETTE[(index - 1) % len(_PALETTE)]


def class_colors(n: int) -> list[tuple[int, int, int, int]]:
    """RGBA of ``n`` classes: class 0 (background) transparent, the others opaque."""
    return [(0, 0, 0, 0)] + [(*class_color(i), 255) for i in range(1, n)]
