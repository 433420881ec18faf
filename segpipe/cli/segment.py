"""``segpipe demo``, ``ingest``, ``segment`` and ``info``: one image in, one result out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
import types
import typing
from pathlib import Path
from typing import Any

from segpipe.cli.text import print_summary
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
        flag = _flag(f)
        default = getattr(defaults, f.name)
        group.add_argument(
            flag,
            dest=f.name,
            default=default,
            help=_option_help(str(f.metadata["help"]), default),
            **_option_kind(f.name, annotations[f.name], flag),
        )


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


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
        return {"type": annotation, "metavar": _metavar(name, annotation)}
    raise TypeError(f"SegmentConfig.{name}: no command-line option for {annotation}")


# What an option's value is, for `--tile PIXELS` in the help; a field not named here gets its
# type's word (N, NUMBER, TEXT).
_METAVARS = {
    "tile": "PIXELS",
    "window": "PIXELS",
    "min_level_size": "PIXELS",
    "overlap": "FRACTION",
    "sigma_scale": "FRACTION",
    "pixel_size_um": "UM",
    "device": "DEVICE",
    "scheduler": "ADDRESS",
}
_TYPE_METAVARS = {int: "N", float: "NUMBER", str: "TEXT"}


def _metavar(name: str, annotation: Any) -> str:
    if name in _METAVARS:
        return _METAVARS[name]
    for suffix, unit in (("_um", "UM"), ("_px", "PIXELS"), ("_s", "SECONDS")):
        if name.endswith(suffix):
            return unit
    return _TYPE_METAVARS[annotation]


def config_from_args(args: argparse.Namespace) -> SegmentConfig:
    """The :class:`~segpipe.config.SegmentConfig` of options added by
    :func:`add_config_options` (validated: a bad value raises ``ValueError`` naming its
    option)."""
    try:
        config = SegmentConfig(**{f.name: getattr(args, f.name) for f in settings()})
    except ValueError as err:
        # The library names the field (SegmentConfig.n_workers); the shell's user typed --workers.
        flags = {f.name: _flag(f) for f in settings()}
        text = re.sub(r"SegmentConfig\.(\w+)", lambda m: flags.get(m[1], m[0]), str(err))
        raise ValueError(text) from err
    _check_device(config)
    return config


def _check_device(config: SegmentConfig) -> None:
    """Refuse a ``--device`` this machine lacks (``cuda`` without a GPU, ``cuda:3`` with two,
    ``mps`` off a Mac) here, before any work.

    Only where the work runs in this process or on a local cluster: a remote scheduler's
    workers (``--scheduler tcp://...`` or dask's ``scheduler-address``, which
    DASK_SCHEDULER_ADDRESS sets) may have the GPU this machine lacks.
    """
    if config.device in ("auto", "cpu") or config.scheduler not in (None, "sync"):
        return
    import dask.config

    if config.scheduler is None and dask.config.get("scheduler-address", None):
        return
    from segpipe.execution.predictor import missing_device

    if (missing := missing_device(config.device)) is not None:
        raise ValueError(
            f"--device {config.device}: {missing} on this machine; use --device cpu or "
            "--device auto"
        )


def add_segment_options(p: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    """The model and every :class:`~segpipe.config.SegmentConfig` option (plus
    ``--overwrite``): what every segmenting command shares."""
    p.add_argument(
        "--model",
        default="tissue-unet",
        metavar="MODEL",
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
    demo.add_argument(
        "--size", type=int, default=8192, metavar="PIXELS", help="side of the generated slide"
    )
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the slide")
    demo.add_argument(
        "--out", default="segpipe-demo", metavar="DIR", help="working directory for all files"
    )
    add_segment_options(demo)
    demo.set_defaults(run=_demo)


def add_ingest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ing = sub.add_parser("ingest", help="copy an image into a chunked OME-Zarr pyramid")
    ing.add_argument("source", metavar="SOURCE", help="image file (TIFF, OME-TIFF, SVS, Zarr, ...)")
    ing.add_argument("output", metavar="OUTPUT", help="OME-Zarr store to write (.zarr)")
    ing.add_argument(
        "--chunk", type=int, default=512, metavar="PIXELS", help="chunk side of every level"
    )
    ing.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        dest="pixel_size_um",
        metavar="UM",
        help="microns per pixel at level 0 (default: what the file says)",
    )
    ing.add_argument("--overwrite", action="store_true", help="replace an existing store at OUTPUT")
    ing.set_defaults(run=_ingest)


def add_segment(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    seg = sub.add_parser("segment", help="segment an image into a result store")
    seg.add_argument("source", metavar="SOURCE", help="image file or OME-Zarr store")
    seg.add_argument("output", metavar="OUTPUT", help="result store to write (.seg.zarr)")
    add_segment_options(seg)
    seg.set_defaults(run=_segment)


def add_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    info = sub.add_parser("info", help="describe a result or an image")
    info.add_argument("path", metavar="PATH", help="a result store or an image")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=_info)


def _demo(args: argparse.Namespace) -> int:
    from segpipe.flows.limits import require_server
    from segpipe.flows.segment_slide import segment_slide
    from segpipe.synthetic.demo import make_demo_slide

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # mkdir's "File exists" named no option
        raise NotADirectoryError(f"--out {out}: is a file, not a folder")
    config = config_from_args(args)
    # Before the slide: making it is a long wait at the default size, for nothing if the
    # server named is down.
    require_server()
    if not args.quiet:
        print(
            f"generating a {args.size} x {args.size} px synthetic slide in {out}/ ...", flush=True
        )
    slide = make_demo_slide(out, size=args.size, seed=args.seed)
    result = out / f"{slide.image.name.removesuffix('.ome.tif')}.seg.zarr"
    summary = segment_slide(
        str(slide.image),
        str(result),
        args.model,
        config=config,
        ground_truth=str(slide.truth),
        overwrite=args.overwrite,
    )
    dice = summary["dice"]
    if not args.quiet:
        print()
        print_summary(summary)
    print(f"mean Dice (tissue, nucleus) against ground truth: {(dice[1] + dice[2]) / 2:.4f}")
    if not args.quiet:
        print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from segpipe.io.ingest import ingest
    from segpipe.io.units import check_pixel_size

    # Checked here to name the options the user typed; the library names its parameters.
    if args.chunk < 2:
        raise ValueError(f"--chunk must be an integer >= 2 (pixels), got {args.chunk}")
    if args.pixel_size_um is not None:
        check_pixel_size(args.pixel_size_um, "--pixel-size")
    out = ingest(
        args.source,
        args.output,
        chunk=args.chunk,
        pixel_size_um=args.pixel_size_um,
        overwrite=args.overwrite,
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
    )
    print(out)
    return 0


def _info(args: argparse.Namespace) -> int:
    from segpipe.io.files import location
    from segpipe.results import is_result, read_meta

    path = location(args.path)  # a result or image at a URL too (s3://bucket/a.seg.zarr)
    # A result whose metadata this release cannot read is refused naming why, not described
    # as an image.
    meta = read_meta(path) if is_result(path) else None
    if meta is None:
        from segpipe.io.describe import describe_image

        image = describe_image(path)
        print(json.dumps(image.to_dict(), indent=2) if args.json else "\n".join(image.lines()))
        return 0
    from segpipe.query import describe

    described = describe(path)
    if not described["complete"]:
        if args.json:
            print(json.dumps(described, indent=2, default=str))
            return 1
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
    print_summary(summary)
    print("levels: " + ", ".join(f"{y} x {x}" for y, x in described["levels"]))
    print(
        f"model: {meta.model_name} (sha256 {meta.model_sha256[:16]}...), "
        f"mode {meta.config.mode}, tile {meta.tile}, halo {meta.halo}"
    )
    print(f"source: {meta.source}")
    print(f"run: {meta.started} -> {meta.finished}, segpipe {meta.version}")
    return 0
