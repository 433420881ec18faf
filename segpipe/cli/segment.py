"""``segpipe demo``, ``ingest``, ``segment`` and ``info``: one image in, one result out."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["add_demo", "add_info", "add_ingest", "add_segment", "add_segment_options"]


def add_segment_options(p: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    """The model, tiling and execution options every segmenting command shares."""
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


def add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="segment a generated slide with the shipped model")
    demo.add_argument("--size", type=int, default=8192, help="slide side, pixels (default 8192)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="segpipe-demo", help="working directory")
    add_segment_options(demo)
    demo.set_defaults(run=_demo)


def add_ingest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ing = sub.add_parser("ingest", help="copy an image into a chunked OME-Zarr pyramid")
    ing.add_argument("source")
    ing.add_argument("output")
    ing.add_argument("--chunk", type=int, default=512)
    ing.add_argument("--pixel-size", type=float, default=None, dest="pixel_size_um")
    ing.add_argument("--overwrite", action="store_true")
    ing.set_defaults(run=_ingest)


def add_segment(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    seg = sub.add_parser("segment", help="segment an image into a result store")
    seg.add_argument("source")
    seg.add_argument("output")
    add_segment_options(seg)
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
    seg.set_defaults(run=_segment)


def add_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    info = sub.add_parser("info", help="describe a result or an image")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)


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
    from segpipe.synthetic.demo import make_demo_slide

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
    from segpipe.flows.segment_slide import segment_slide

    summary = segment_slide(
        str(slide.image), str(result), ground_truth=str(slide.truth), progress=True, **options
    )
    print()
    _print_summary(summary)
    dice = summary["dice"]
    print(f"mean Dice (tissue, nucleus) against ground truth: {(dice[1] + dice[2]) / 2:.4f}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from segpipe.io.ingest import ingest

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


def _segment(args: argparse.Namespace) -> int:
    from segpipe.execution.segment import segment

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


def _info(args: argparse.Namespace) -> int:
    from segpipe.results import read_meta

    path = Path(args.path)
    try:
        meta = read_meta(path)
    except (FileNotFoundError, ValueError):
        meta = None
    if meta is None:
        from segpipe.io.readers import open_image

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
    from segpipe.analysis.summary import summarise

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
