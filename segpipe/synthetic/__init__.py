"""Synthetic H&E whole-slide scans and aerial scenes with exact ground truth, generated in memory.

Nothing here reads or writes files and nothing is downloaded: a slide is a function of its
shape, its seed and its pixel size. It is meant to look enough like a brightfield H&E scan that a
model trained on it behaves like one trained on real slides for the pipeline's purposes (tiling,
halos, stitching, metrics), and to give labels no annotator could: every pixel's class and every
nucleus's identity.

A second scene, :func:`aerial_scene`, is an aerial-photograph-like map (other ground,
buildings, roads, vegetation, water) with building instances, rows of houses sharing walls
among them: the same touching-objects problem at another scale.

The modules:

* :mod:`~segpipe.synthetic.slide`: :class:`SyntheticSlide` (an image with its class and
  instance labels), the tissue class names, and the smooth-noise and resizing helpers both
  scenes are built from;
* :mod:`~segpipe.synthetic.tissue`: :func:`tissue_slide`, the H&E scan (how it is built, coarse
  to fine, is told there);
* :mod:`~segpipe.synthetic.aerial`: :func:`aerial_scene` and :data:`AERIAL_CLASS_NAMES`.
"""

from __future__ import annotations

from segpipe.synthetic.aerial import AERIAL_CLASS_NAMES, aerial_scene
from segpipe.synthetic.slide import BACKGROUND, CLASS_NAMES, NUCLEUS, TISSUE, SyntheticSlide
from segpipe.synthetic.tissue import tissue_slide

__all__ = [
    "AERIAL_CLASS_NAMES",
    "BACKGROUND",
    "CLASS_NAMES",
    "NUCLEUS",
    "TISSUE",
    "SyntheticSlide",
    "aerial_scene",
    "tissue_slide",
]
