"""``segpipe demo``, ``ingest``, ``segment`` and ``info``: one image in, one result out."""

from __future__ import annotations

import argparse
import json
import time
import types
import typing
from pathlib import Path
from typing import Any

from segpipe.config import SegmentConfig, settings

__all__ = [
    "add_config_options",
    "add_demo",
    "add_info",
    "add_ingest",
    "add_segment",
    "add_segment_options",
    "config_from_args",
]


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`~segpipe.config.SegmentConfig` field, built from the fields.

    The flag is the field's metadata ``flag`` or ``--`` + its name with dashes; the type comes
    from its annotation (``choices`` for a ``Literal``, ``--x/--no-x`` for a boolean); the help
    is the field's help with its default. Every option's ``dest`` is the field's name and its
    default the field's default, so :func:`config_from_args` reads them back by name. A field
    added to ``SegmentConfig`` becomes an option of every segmenting command here.
    """
    group = p.add_argument_group("segmentation settings (segpipe.SegmentConfig)")
    annotations = typing.get_type_hints(SegmentConfig)
    defaults = SegmentConfig()
    for f in settings():
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        group.add_argument(
            flag,
            dest=f.name,
            default=default,
            help=_option_help(str(f.metadata["help"]), default),
            **_option_kind(f.name, annotations[f.name], flag),
        )


def _option_help(text: str, default: Any) -> str:
    if "default" not in text:  # some helps say what the default means ("default: on CUDA")
        text += f" (default: {'none' if default is None else default})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _option_kind(name: str, annotation: Any, flag: str) -> dict[str, Any]:
    """``type``/``choices``/``action`` of the option ``flag`` of a field annotated
    ``annotation`` (``X | None`` takes an ``X``: None is the default, never typed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"SegmentConfig.{name}: no command-line option for {annotation}")
        annotation = kinds[0]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {"type": type(args[0]), "choices": args}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": flag.lstrip("-").replace("-", "_").upper()}
    raise TypeError(f"SegmentConfig.{name}: no command-line option for {annotation}")


def config_from_args(args: argparse.Namespace) -> SegmentConfig:
    """The :class:`~segpipe.config.SegmentConfig` of options added by
    :func:`add_config_options` (validated: a bad value raises ``ValueError`` naming it)."""
    return SegmentConfig(**{f.name: getattr(args, f.name) for f in settings()})


def add_segment_options(p: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    """The model and every :class:`~segpipe.config.SegmentConfig` option (plus
    ``--overwrite``): what every segmenting command shares."""
    p.add_argument(
        "--model",
        default="tissue-unet",
        help="shipped model name or checkpoint path (default: tissue-unet)",
    )
    add_config_options(p)
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
    from segpipe.flows.segment_slide import segment_slide

    summary = segment_slide(
        str(slide.image),
        str(result),
        args.model,
        config=config_from_args(args),
        ground_truth=str(slide.truth),
        overwrite=args.overwrite,
        progress=True,
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
        config_from_args(args),
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
        f"model: {meta.model_name} (sha256 {meta.model_sha256[:16]}...), "
        f"mode {meta.config.mode}, tile {meta.tile}, halo {meta.halo}"
    )
    print(f"source: {meta.source}")
    print(f"run: {meta.started} -> {meta.finished}, segpipe {meta.version}")
    return 0
