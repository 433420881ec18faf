"""``segpipe query`` and ``export``: numbers and polygons out of a finished result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segpipe.cli.text import DeprecatedAlias, area_key, area_text

__all__ = ["EXPORT_FORMATS", "add_export", "add_query"]

# What `segpipe export` writes; "ngff-0.4" for each version of segpipe.analysis.ngff's
# NGFF_VERSIONS (not imported here: `segpipe --help` must not pay for zarr).
EXPORT_FORMATS = ("geojson", "ngff-0.4")


def add_query(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("query", help="class areas, thresholds and objects, whole or in a region")
    q.add_argument("result", metavar="RESULT", help="a finished result store")
    q.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=None,
        metavar="NAME",
        help="repeatable; default every class (--threshold and --objects need exactly one)",
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
    q.add_argument("--overwrite", action="store_true", help="replace an existing --table file")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(run=_query)


def add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser(
        "export", help="class polygons as GeoJSON (QuPath, QGIS), or an OME-NGFF 0.4 copy"
    )
    ex.add_argument("result", metavar="RESULT", help="a finished result store")
    # Optional only for the old spellings below, which name the output themselves.
    ex.add_argument(
        "output",
        nargs="?",
        default=None,
        metavar="OUTPUT",
        help="file or folder to write: .geojson (polygons) or .zarr (an OME-NGFF 0.4 copy)",
    )
    ex.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="what to write (default: from OUTPUT's suffix); ngff-0.4 is a Zarr v2 copy of "
        "the probability and label pyramids, what QuPath reads",
    )
    ex.add_argument(
        "--geojson",
        action=DeprecatedAlias,
        metavar="OUT",
        new="write `segpipe export RESULT OUT.geojson`",
    )
    ex.add_argument(
        "--ngff",
        action=DeprecatedAlias,
        nargs=2,
        metavar=("VERSION", "OUT"),
        new="write `segpipe export RESULT OUT.zarr` (or --format ngff-0.4)",
    )
    ex.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output: a GeoJSON file, or a folder an earlier export wrote "
        "(nothing else is deleted)",
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
        help="coordinates of the polygons: level-0 pixels of the source image (QuPath's, and "
        "what --foreground takes), microns, or the image's CRS (named in the file when it "
        "has an EPSG-style code; a WKT-only CRS is not, so tell your GIS which it is)",
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
    from segpipe.io.files import write_text_atomic
    from segpipe.query import region_report

    # A class given twice is reported once (and is still the one class --objects needs).
    classes = list(dict.fromkeys(args.classes or []))
    if len(classes) > 1 and (args.threshold is not None or args.objects):
        raise ValueError("--threshold and --objects work on one class; give --class once")
    # Refused, not implied: --objects labels every object of the class, which a typo in a
    # script should not start (and --table alone would write nothing).
    if args.table and not args.objects:
        raise ValueError(f"--table {args.table} writes the object table of --objects; add it")
    if args.table:
        _check_table(args.table, args.result, overwrite=args.overwrite)
    report = region_report(
        args.result,
        class_name=classes[0] if len(classes) == 1 else None,
        region=tuple(args.region) if args.region else None,
        level=args.level,
        threshold=args.threshold,
        objects=args.objects,
        connectivity=args.connectivity,
    )
    if len(classes) > 1:
        report["classes"] = _only(report["classes"], classes, args.result)
    table = report.pop("object_table", None)
    if args.table and table is not None:
        import pandas as pd

        from segpipe.analysis.objects import OBJECT_COLUMNS

        # Whole or not at all: a failed write never leaves half a table, nor a half-replaced one.
        # Its header even with no object: a CSV reader refuses a file of no columns.
        csv = pd.DataFrame(table, columns=list(OBJECT_COLUMNS)).to_csv(index=False)
        write_text_atomic(args.table, csv)
    units = report.pop("area_units")
    if args.json:
        # The unit in the key (`area_um2`), as `info --json` has `class_area_um2`.
        for c in report["classes"]:
            c[area_key(units)] = c.pop("area")
        print(json.dumps({**report, "area_units": units}, indent=2, default=str))
        return 0
    where = f" in region {report['region']}" if report["region"] else ""
    print(f"{report['path']} (level {report['level']}){where}:")
    for c in report["classes"]:
        print(
            f"  {c['name']:<12} {100 * c['fraction']:6.2f} %  "
            f"{area_text(c['area'], units):>20}  ({c['pixels']} px)"
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


def _check_table(table: str, result: str, *, overwrite: bool) -> None:
    """Refuse ``--table`` where it is a folder, or a file and not ``overwrite``, or in the
    result: before the objects are labelled, which may take long."""
    from segpipe.analysis.objects import OBJECT_COLUMNS
    from segpipe.atomic import check_writable
    from segpipe.io.files import URLPath, location
    from segpipe.io.places import check_replaceable, overlap

    where = location(table)
    if relation := overlap(where, result):
        raise ValueError(f"--table {table} {relation} the result {result}; name another file")
    if where.is_dir():
        raise IsADirectoryError(f"--table {table} is a folder; name a .csv file")
    if where.exists() and not overwrite:
        raise FileExistsError(f"--table {table} exists; pass --overwrite to replace it")
    if where.exists():  # a table written before: its header
        check_replaceable(where, "object table", ",".join(OBJECT_COLUMNS).encode())
    if not isinstance(where, URLPath):
        check_writable(where)  # a file where a folder must be, a read-only folder


def _only(classes: list[dict[str, Any]], names: list[str], result: str) -> list[dict[str, Any]]:
    """The entries of ``classes`` named ``names``, in that order; an unknown name refused."""
    by_name = {c["name"]: c for c in classes}
    for name in names:
        if name not in by_name:
            raise ValueError(f"no class {name!r} in {result}; classes: {', '.join(by_name)}")
    return [by_name[name] for name in names]


def _export_targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(format, path) of each output asked for: OUTPUT, and the deprecated flags' ones."""
    targets = []
    if args.output:
        targets.append((args.format or _format_of(args.output), args.output))
    elif args.format:
        raise ValueError(f"--format {args.format} needs an OUTPUT to write")
    if getattr(args, "geojson", None):
        targets.append(("geojson", args.geojson))
    if getattr(args, "ngff", None):
        version, path = args.ngff
        if f"ngff-{version}" not in EXPORT_FORMATS:
            raise ValueError(
                f"--ngff {version} is not supported; formats: {', '.join(EXPORT_FORMATS)} "
                "(the result itself is OME-Zarr 0.5)"
            )
        targets.append((f"ngff-{version}", path))
    if not targets:
        raise ValueError(
            "export needs an OUTPUT: a .geojson file for polygons, or a .zarr folder for an "
            "OME-NGFF 0.4 copy"
        )
    return targets


def _format_of(output: str) -> str:
    suffix = Path(output.rstrip("/")).suffix.lower()
    if suffix in (".geojson", ".json"):
        return "geojson"
    if suffix == ".zarr":
        return "ngff-0.4"
    raise ValueError(
        f"cannot tell what to write to {output} from its suffix; name it .geojson or .zarr, "
        f"or pass --format ({', '.join(EXPORT_FORMATS)})"
    )


# The options only the polygons take, with their defaults: an NGFF copy is of the whole
# result, every class and level, so one of these given there would be silently ignored.
_GEOJSON_ONLY = {
    "classes": ("--class", None),
    "region": ("--region", None),
    "level": ("--level", 0),
    "coords": ("--coords", "pixel"),
    "threshold": ("--threshold", None),
    "connectivity": ("--connectivity", 1),
    "min_area": ("--min-area", 0.0),
    "object_type": ("--object-type", "detection"),
}


def _refuse_geojson_options(args: argparse.Namespace) -> None:
    for dest, (option, default) in _GEOJSON_ONLY.items():
        if getattr(args, dest) != default:
            raise ValueError(
                f"{option} applies to GeoJSON export only; an OME-NGFF copy holds the whole "
                "result: drop it, or export to a .geojson file"
            )


def _export(args: argparse.Namespace) -> int:
    from segpipe.analysis.ngff import export_ngff04
    from segpipe.vectors import export_geojson

    targets = _export_targets(args)
    if all(kind != "geojson" for kind, _ in targets):
        _refuse_geojson_options(args)
    for kind, output in targets:
        if kind == "ngff-0.4":
            print(export_ngff04(args.result, output, overwrite=args.overwrite))
            continue
        region = tuple(args.region) if args.region else None
        print(
            export_geojson(
                args.result,
                output,
                classes=args.classes,
                level=args.level,
                region=region,
                coords=args.coords,
                threshold=args.threshold,
                connectivity=args.connectivity,
                min_area=args.min_area,
                object_type=args.object_type,
                overwrite=args.overwrite,
            )
        )
    return 0
