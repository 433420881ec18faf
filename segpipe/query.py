"""Questions to a result (public facade): areas, thresholds, objects, reports.

The code lives in :mod:`segpipe.analysis`; this module keeps ``from segpipe import query``
working as documented.
"""

from __future__ import annotations

from segpipe.analysis.objects import object_labels, object_table
from segpipe.analysis.regions import Region, class_areas, select_region, threshold_mask
from segpipe.analysis.reports import describe, region_report

__all__ = [
    "Region",
    "class_areas",
    "describe",
    "object_labels",
    "object_table",
    "region_report",
    "select_region",
    "threshold_mask",
]
