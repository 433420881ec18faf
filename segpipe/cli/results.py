"""``segpipe query`` and ``export``: numbers and polygons out of a finished result."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_export", "add_query"]


def add_query(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("query", help="class areas, thresholds and objects, whole or in a region")
    q.add_argument("result", metavar="RESULT", help="a finished result store")
    q.add_argument(
        "--class",
        dest="class_name",
        default=None,
        metavar="NAME",
        help="class name (areas: all classes when omitted)",
    )
    q.add_argument(
        "--region",
        nargs=4,
        type=float,
        metavar=("X0", "Y0", "X1", "Y1"),
        default=None,
        help="region in the result's coordinates (µm, or CRS units)",
    )
    q.add_argument("--level", type=int, default=0, metavar="N", help="pyramid level")
    q.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="P",
        help="count pixels with probability > P (needs --class); objects from it",
    )
    q.add_argument("--objects", action="store_true", help="count connected objects of --class")
    q.add_argument(
        "--connectivity",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: objects touch by edges, 2: also by corners",
    )
    q.add_argument("--table", default=None, metavar="CSV", help="write the object table")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(run=_query)


def add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser(
        "export", help="class polygons as GeoJSON (QuPath, QGIS), or an OME-NGFF 0.4 copy"
    )
    ex.add_argument("result", metavar="RESULT", help="a finished result store")
    ex.add_argument("--geojson", default=None, metavar="OUT", help="GeoJSON file to write")
    ex.add_argument(
        "--ngff",
        nargs=2,
        default=None,
        metavar=("VERSION", "OUT"),
        help="write a Zarr v2 copy of the probability and label pyramids as OME-NGFF VERSION "
        "(0.4: what QuPath reads)",
    )
    ex.add_argument(
        "--overwrite", action="store_true", help="replace an existing --ngff output folder"
    )
    ex.add_argument(
        "--object-type",
        dest="object_type",
        choices=("detection", "annotation"),
        default="detection",
        help="QuPath object type of the polygons: detection (many small objects, e.g. "
        "nuclei) or annotation (a few large regions, e.g. tissue)",
    )
    ex.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=None,
        metavar="NAME",
        help="repeatable; default every class but the first (background)",
    )
    ex.add_argument("--level", type=int, default=0, metavar="N", help="pyramid level")
    ex.add_argument(
        "--region",
        nargs=4,
        type=float,
        metavar=("X0", "Y0", "X1", "Y1"),
        default=None,
        help="region in the result's coordinates (default: the whole result)",
    )
    ex.add_argument(
        "--coords",
        choices=("pixel", "micron", "crs"),
        default="pixel",
        help="coordinates of the polygons",
    )
    ex.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="P",
        help="polygons of probability > P instead of the mask (default: the mask)",
    )
    ex.add_argument(
        "--connectivity",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: objects touch by edges, 2: also by corners",
    )
    ex.add_argument(
        "--min-area",
        type=float,
        default=0.0,
        dest="min_area",
        metavar="AREA",
        help="smallest object kept, µm² (CRS units², or px)",
    )
    ex.set_defaults(run=_export)


def _query(args: argparse.Namespace) -> int:
    from segpipe.query import region_report

    report = region_report(
        args.result,
        class_name=args.class_name,
        region=tuple(args.region) if args.region else None,
        level=args.level,
        threshold=args.threshold,
        objects=args.objects,
        connectivity=args.connectivity,
    )
    table = report.pop("object_table", None)
    if args.table and table is not None:
        import pandas as pd

        pd.DataFrame(table).to_csv(args.table, index=False)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    where = f" in region {report['region']}" if report["region"] else ""
    print(f"{report['path']} (level {report['level']}){where}:")
    for c in report["classes"]:
        print(
            f"  {c['name']:<12} {100 * c['fraction']:6.2f} %  "
            f"{c['area']:,.1f} {report['area_units']}  ({c['pixels']} px)"
        )
    if "threshold" in report:
        t = report["threshold"]
        print(f"  {t['class']} with p > {t['threshold']}: {t['pixels']} px")
    if "objects" in report:
        o = report["objects"]
        print(
            f"  {o['count']} {o['class']} objects"
            + (f" (table: {args.table})" if args.table else "")
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from segpipe.analysis.ngff import NGFF_VERSIONS, export_ngff04
    from segpipe.vectors import export_geojson

    if not args.geojson and not args.ngff:
        raise ValueError("export needs --geojson OUT or --ngff 0.4 OUT (or both)")
    if args.ngff and args.ngff[0] not in NGFF_VERSIONS:
        raise ValueError(
            f"--ngff {args.ngff[0]} is not supported; versions: {', '.join(NGFF_VERSIONS)} "
            "(the result itself is OME-Zarr 0.5)"
        )
    if args.geojson:
        region = tuple(args.region) if args.region else None
        print(
            export_geojson(
                args.result,
                args.geojson,
                classes=args.classes,
                level=args.level,
                region=region,
                coords=args.coords,
                threshold=args.threshold,
                connectivity=args.connectivity,
                min_area=args.min_area,
                object_type=args.object_type,
            )
        )
    if args.ngff:
        print(export_ngff04(args.result, args.ngff[1], overwrite=args.overwrite))
    return 0
