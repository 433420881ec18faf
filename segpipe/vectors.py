"""Class polygons as GeoJSON (public facade of :mod:`segpipe.analysis.vectors`)."""

from __future__ import annotations

from segpipe.analysis.vectors import COORDINATES, OBJECT_TYPES, class_features, export_geojson

__all__ = ["COORDINATES", "OBJECT_TYPES", "class_features", "export_geojson"]
