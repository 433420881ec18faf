"""``segpipe`` command line: a thin shell over the public API.

segpipe demo [--size 8192]           synthetic slide -> Prefect flow -> areas and Dice
segpipe ingest IN OUT.zarr           any supported image -> OME-Zarr 0.5 pyramid
segpipe segment IN OUT.zarr          segment (library code, no Prefect)
segpipe info PATH                    what a result (or an image) holds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before Prefect and distributed are imported anywhere: no telemetry from a machine that may be
# offline, and no cluster start/stop chatter (dask reads its logging config at import; the
# workers inherit the environment). `-v` or these variables set by the user bring them back.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if "-v" not in sys.argv and "--verbose" not in sys.argv:
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

__all__ = ["main"]


def _user_errors() -> tuple[type[Exception], ...]:
    # Bad input and refusals get one line naming the file; anything else is a bug: traceback.
    from segpipe.results import IncompleteResultError

    return (ValueError, OSError, IncompleteResultError)


def _segment_options(p: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    p.add_argument(
        "--model",
        default="tissue-unet",
        help="shipped model name or checkpoint path (default: tissue-unet)",
    )
    p.add_argument("--tile", type=int, default=512, help="output tile / chunk side, pixels")
    p.add_argument("--mode", choices=("exact", "blend"), default="exact")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--scheduler",
        default=None,
        help="Dask scheduler address (tcp://HOST:PORT); default a local cluster",
    )
    p.add_argument("--workers", type=int, default=None, help="local cluster workers")
    p.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        dest="pixel_size_um",
        help="microns per pixel at level 0, overriding the file",
    )
    if overwrite:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an existing result made with other parameters",
        )


def _archive_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="archive folder or fsspec URL")
    p.add_argument("output_root", help="results, reports, locks and the catalog")
    _segment_options(p, overwrite=False)
    p.add_argument("--pattern", default="*", help="file name glob (default *)")
    p.add_argument(
        "--min-age",
        type=float,
        default=0.0,
        dest="min_age_s",
        help="skip files modified in the last N seconds (still being written)",
    )
    p.add_argument("--max-concurrent", type=int, default=1, help="images at once in a run")
    p.add_argument(
        "--concurrency-limit",
        default=None,
        help="name of a Prefect global concurrency limit shared across runs",
    )
    p.add_argument("--retries", type=int, default=2, help="retries of transient failures")
    p.add_argument("--retry-delay", type=float, default=10.0, dest="retry_delay_s")
    p.add_argument(
        "--lock-ttl",
        type=float,
        default=600.0,
        dest="lock_ttl_s",
        help="seconds before a silent claim may be taken over",
    )
    p.add_argument(
        "--fail-on-error", action="store_true", help="end the run failed when any image failed"
    )


def _archive_parameters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "pattern": args.pattern,
        "min_age_s": args.min_age_s,
        "tile": args.tile,
        "mode": args.mode,
        "device": args.device,
        "scheduler": args.scheduler,
        "n_workers": args.workers,
        "pixel_size_um": args.pixel_size_um,
        "max_concurrent": args.max_concurrent,
        "concurrency_limit": args.concurrency_limit,
        "retries": args.retries,
        "retry_delay_s": args.retry_delay_s,
        "lock_ttl_s": args.lock_ttl_s,
        "fail_on_error": args.fail_on_error,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="segment a generated slide with the shipped model")
    demo.add_argument("--size", type=int, default=8192, help="slide side, pixels (default 8192)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="segpipe-demo", help="working directory")
    _segment_options(demo)

    ing = sub.add_parser("ingest", help="copy an image into a chunked OME-Zarr pyramid")
    ing.add_argument("source")
    ing.add_argument("output")
    ing.add_argument("--chunk", type=int, default=512)
    ing.add_argument("--pixel-size", type=float, default=None, dest="pixel_size_um")
    ing.add_argument("--overwrite", action="store_true")

    seg = sub.add_parser("segment", help="segment an image into a result store")
    seg.add_argument("source")
    seg.add_argument("output")
    _segment_options(seg)
    seg.add_argument("--window", type=int, default=None, help="blend window side, pixels")
    seg.add_argument("--overlap", type=float, default=0.25, help="blend window overlap")
    seg.add_argument("--level", type=int, default=0, help="pyramid level to segment")
    seg.add_argument("--batch-size", type=int, default=4)
    seg.add_argument(
        "--probability-dtype",
        choices=("float16", "float32", "uint8"),
        default="float16",
        help="uint8 stores CF scale_factor/add_offset that xarray decodes",
    )
    seg.add_argument(
        "--task-tiles",
        type=int,
        default=2,
        help="tiles per task along each side; a task writes one shard",
    )
    seg.add_argument(
        "--min-level-size",
        type=int,
        default=256,
        help="stop the result pyramid when a side would fall below this",
    )

    arc = sub.add_parser("archive", help="segment the new or changed images of a folder, once")
    _archive_options(arc)
    srv = sub.add_parser("serve", help="run the archive flow on a cron schedule (flow.serve)")
    _archive_options(srv)
    srv.add_argument("--cron", default="0 2 * * *", help='schedule (default "0 2 * * *")')
    srv.add_argument("--timezone", default="UTC")
    srv.add_argument("--name", default="archive", help="deployment name")
    srv.add_argument("--paused", action="store_true", help="register the schedule paused")

    q = sub.add_parser("query", help="class areas, thresholds and objects, whole or in a region")
    q.add_argument("result")
    q.add_argument(
        "--class",
        dest="class_name",
        default=None,
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
    q.add_argument("--level", type=int, default=0, help="pyramid level")
    q.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="count pixels with probability > T (needs --class); objects from it",
    )
    q.add_argument("--objects", action="store_true", help="count connected objects of --class")
    q.add_argument("--connectivity", type=int, choices=(1, 2), default=1)
    q.add_argument("--table", default=None, metavar="CSV", help="write the object table")
    q.add_argument("--json", action="store_true", help="machine-readable output")

    ex = sub.add_parser("export", help="class polygons as GeoJSON (QuPath, QGIS)")
    ex.add_argument("result")
    ex.add_argument("--geojson", required=True, metavar="OUT")
    ex.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=None,
        help="repeatable; default every class but the first (background)",
    )
    ex.add_argument("--level", type=int, default=0)
    ex.add_argument("--region", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), default=None)
    ex.add_argument("--coords", choices=("pixel", "micron", "crs"), default="pixel")
    ex.add_argument("--threshold", type=float, default=None)
    ex.add_argument("--connectivity", type=int, choices=(1, 2), default=1)
    ex.add_argument(
        "--min-area",
        type=float,
        default=0.0,
        dest="min_area",
        help="smallest object kept, µm² (CRS units², or px)",
    )

    tr = sub.add_parser("train", help="train a model on synthetic scenes or a folder of pairs")
    tr.add_argument("output", help="checkpoint to write (.pt)")
    tr.add_argument(
        "--architecture",
        default="unet",
        help="registry name (unet, fcn, fcn-updown, sliding-window) or a checkpoint",
    )
    tr.add_argument("--dataset", choices=("tissue", "aerial", "folder"), default="tissue")
    tr.add_argument("--train-folder", default=None, help="images/ labels/ [instances/] folder")
    tr.add_argument("--val-folder", default=None)
    tr.add_argument("--steps", type=int, default=500, help="optimiser steps per epoch")
    tr.add_argument("--epochs", type=int, default=1)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--patch", type=int, default=92, help="label crop side, pixels")
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--slide-size", type=int, default=2048, help="synthetic training scene side")
    tr.add_argument("--num-slides", type=int, default=4)
    tr.add_argument("--val-size", type=int, default=1024)
    tr.add_argument(
        "--loss-weights",
        choices=("none", "balanced", "unet"),
        default="none",
        help="unet: class balance plus the border term between touching objects",
    )
    tr.add_argument("--w0", type=float, default=10.0)
    tr.add_argument("--sigma", type=float, default=5.0, dest="sigma_px")
    tr.add_argument(
        "--separate-touching",
        action="store_true",
        help="cut one-pixel gaps between touching objects in the training labels",
    )
    tr.add_argument(
        "--elastic-std",
        type=float,
        default=0.0,
        dest="elastic_std_px",
        help="elastic deformation, pixels (0 = off)",
    )
    tr.add_argument("--jitter", type=float, default=0.0, help="intensity jitter (0 = off)")
    tr.add_argument("--checkpoint-dir", default=None, help="a checkpoint per epoch here")
    tr.add_argument("--resume", default=None, dest="resume_from", help="epoch checkpoint")
    tr.add_argument("--width", type=int, default=None)
    tr.add_argument("--depth", type=int, default=None)
    tr.add_argument("--padding", choices=("valid", "same"), default=None)
    tr.add_argument("--full-precision", action="store_true", help="save float32 weights")
    tr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("evaluate", help="per-class IoU/Dice and object F1 against ground truth")
    ev.add_argument("prediction", help="a result store, or a model (name or checkpoint)")
    ev.add_argument("ground_truth", help="one-channel label image (class ids)")
    ev.add_argument("--image", default=None, help="image to segment when PREDICTION is a model")
    ev.add_argument("--instances", default=None, help="ground-truth object ids, for object F1")
    ev.add_argument("--object-class", default=None, help="class whose objects are scored")
    ev.add_argument("--iou-threshold", type=float, default=0.5)
    ev.add_argument(
        "--min-size",
        type=int,
        default=0,
        dest="min_size_px",
        help="ignore predicted objects smaller than this, pixels",
    )
    ev.add_argument("--tile", type=int, default=256)
    ev.add_argument("--json", action="store_true", help="machine-readable output")

    info = sub.add_parser("info", help="describe a result or an image")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _area(um2: float) -> str:
    return f"{um2 / 1e6:,.3f} mm²" if um2 >= 1e5 else f"{um2:,.1f} µm²"


def _print_summary(s: dict[str, Any]) -> None:
    print(f"result: {s['path']}  ({s['shape'][0]} x {s['shape'][1]} px", end="")
    print(f", {s['pixel_size_um']} µm/px)" if s["pixel_size_um"] else ")")
    areas = s["class_area_um2"]
    for i, name in enumerate(s["class_names"]):
        line = f"  {name:<12} {100 * s['class_fraction'][i]:6.2f} %"
        if areas:
            line += f"  {_area(areas[i]):>16}"
        if s.get("dice"):
            line += f"  Dice {s['dice'][i]:.4f}"
        print(line)
    print(
        f"tiles: {s['tiles_computed']} computed of {s['tiles_total']}; "
        f"{s['seconds']:.1f} s segmenting ({s['megapixels_per_second']:.2f} Mpx/s)"
    )


def _demo(args: argparse.Namespace) -> int:
    from segpipe.demo import make_demo_slide

    t0 = time.perf_counter()
    out = Path(args.out)
    print(f"generating a {args.size} x {args.size} px synthetic slide in {out}/ ...", flush=True)
    slide = make_demo_slide(out, size=args.size, seed=args.seed)
    result = out / f"{slide.image.name.removesuffix('.ome.tif')}.seg.zarr"
    options = dict(
        model=args.model,
        tile=args.tile,
        mode=args.mode,
        device=args.device,
        scheduler=args.scheduler,
        n_workers=args.workers,
        overwrite=args.overwrite,
        pixel_size_um=args.pixel_size_um,
    )
    from flows.segment_slide import segment_slide

    summary = segment_slide(
        str(slide.image), str(result), ground_truth=str(slide.truth), progress=True, **options
    )
    print()
    _print_summary(summary)
    dice = summary["dice"]
    print(f"mean Dice (tissue, nucleus) against ground truth: {(dice[1] + dice[2]) / 2:.4f}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from segpipe.results import read_meta

    path = Path(args.path)
    try:
        meta = read_meta(path)
    except (FileNotFoundError, ValueError):
        meta = None
    if meta is None:
        from segpipe.readers import open_image

        r = open_image(path)
        info = {
            "path": str(path),
            "kind": "image",
            "levels": [list(s) for s in r.level_shapes],
            "dtype": str(r.dtype),
            "pixel_size_um": r.pixel_size_um,
        }
        print(json.dumps(info, indent=2))
        return 0
    from segpipe.query import describe

    described = describe(path)
    if not described["complete"]:
        print(
            f"{path}: INCOMPLETE segpipe result, {described['tiles_done']}/"
            f"{described['tiles_total']} tiles written; re-run segment with the same output "
            "to finish it"
        )
        return 1
    from segpipe.summary import summarise

    summary = summarise(path).as_dict()
    if args.json:
        print(json.dumps({**described, "summary": summary}, indent=2, default=str))
        return 0
    _print_summary(summary)
    print("levels: " + ", ".join(f"{y} x {x}" for y, x in described["levels"]))
    print(
        f"model: {meta['model']} (sha256 {meta['model_sha256'][:16]}...), mode {meta['mode']}, "
        f"tile {meta['tile']}, halo {meta['halo']}"
    )
    print(f"source: {meta['source']}")
    print(f"run: {meta['started']} -> {meta['finished']}, segpipe {meta['version']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from segpipe import training

    config = training.TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patch=args.patch,
        lr=args.lr,
        seed=args.seed,
        slide_size=args.slide_size,
        num_slides=args.num_slides,
        val_size=args.val_size,
        dataset=args.dataset,
        train_folder=args.train_folder,
        val_folder=args.val_folder,
        loss_weights=args.loss_weights,
        w0=args.w0,
        sigma_px=args.sigma_px,
        separate_touching=args.separate_touching,
        elastic_std_px=args.elastic_std_px,
        jitter=args.jitter,
        checkpoint_dir=args.checkpoint_dir,
        resume_from=args.resume_from,
        progress=not args.no_progress,
    )
    options = {k: getattr(args, k) for k in ("width", "depth", "padding")}
    model = training.initial_model(
        args.architecture,
        class_names=training.class_names_for(config),
        seed=config.seed,
        **{k: v for k, v in options.items() if v is not None},
    )
    result = training.train(model, config)
    out = training.save_trained(
        model,
        config,
        result,
        args.output,
        half=not args.full_precision,
        extra={"command": " ".join(sys.argv)},
    )
    print(training.format_report(result))
    print(out)
    return 0


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


def _serve(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "segpipe serve: error: a schedule needs a Prefect server: run `prefect server start` "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    from flows.archive import serve_archive

    serve_archive(
        args.source,
        args.output_root,
        args.model,
        cron=args.cron,
        timezone=args.timezone,
        name=args.name,
        paused=args.paused,
        **_archive_parameters(args),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "ingest":
            from segpipe.ingest import ingest

            out = ingest(
                args.source,
                args.output,
                chunk=args.chunk,
                pixel_size_um=args.pixel_size_um,
                overwrite=args.overwrite,
                progress=True,
            )
            print(out)
            return 0
        if args.command == "segment":
            from segpipe.api import segment

            out = segment(
                args.source,
                args.output,
                args.model,
                tile=args.tile,
                mode=args.mode,
                window=args.window,
                overlap=args.overlap,
                level=args.level,
                batch_size=args.batch_size,
                device=args.device,
                scheduler=args.scheduler,
                n_workers=args.workers,
                pixel_size_um=args.pixel_size_um,
                probability_dtype=args.probability_dtype,
                task_tiles=args.task_tiles,
                min_level_size=args.min_level_size,
                overwrite=args.overwrite,
                progress=True,
            )
            print(out)
            return 0
        if args.command == "archive":
            from flows.archive import process_archive

            summary = process_archive(
                args.source, args.output_root, args.model, **_archive_parameters(args)
            )
            print(json.dumps(summary, indent=2, default=str))
            return 1 if summary.get("failed") else 0
        if args.command == "serve":
            return _serve(args)
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            from segpipe.evaluation import evaluate

            scores = evaluate(
                args.prediction,
                args.ground_truth,
                image=args.image,
                instances=args.instances,
                object_class=args.object_class,
                iou_threshold=args.iou_threshold,
                min_size_px=args.min_size_px,
                tile=args.tile,
            )
            print(json.dumps(scores.as_dict(), indent=2) if args.json else scores.report())
            return 0
        if args.command == "query":
            return _query(args)
        if args.command == "export":
            from segpipe.vectors import export_geojson

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
                )
            )
            return 0
        return _info(args)
    except _user_errors() as err:
        print(f"segpipe {args.command}: error: {err}", file=sys.stderr)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
