"""What a result is: its typed metadata, and where its levels lie in the store."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

import zarr

from segpipe.config import PROBABILITY_DTYPES, SegmentConfig
from segpipe.geometry.pixels import pyramid_shapes
from segpipe.io.files import URLPath
from segpipe.results.summary import RunSummary, class_areas_um2
from segpipe.version import __version__

__all__ = [
    "FOREGROUND_LABEL",
    "LABEL_NAME",
    "LATER_IDENTITY_KEYS",
    "LAYOUT",
    "LAYOUTS",
    "MAX_CLASSES",
    "PROBABILITY_DTYPES",
    "STATES",
    "IncompleteResultError",
    "ResultMeta",
    "ResultMismatchError",
    "is_complete",
    "is_result",
    "label_path",
    "layout_of",
    "level_path",
    "open_root",
    "parse_meta",
    "read_attrs",
    "read_meta",
    "result_levels",
    "store_of",
    "stored_complete",
]

LABEL_NAME = "mask"
# The label image of the pixels a foreground mask chose (1) and left out (0), where one did.
FOREGROUND_LABEL = "foreground"

# Where a result keeps its arrays, recorded as ``layout`` in its ``segpipe`` attribute (absent:
# 1). :func:`level_path` and :func:`label_path` are the only places that know the difference.
#   1  level 0 at the root, level k in ``levels/<k>``, label levels ``labels/<name>/<k>``
#      (results written before layout 2; still read, and resumed in their own layout)
#   2  level k in group ``<k>``, label levels ``labels/<name>/<k>/<name>``: no group holds
#      arrays of two sizes or has a level below another, so ``xarray.open_datatree`` opens it
#   3  layout 2's paths; levels 1..layout.levels_in_blocks sharded by a task's block halved k
#      times, each task writing its share (layouts 1-2 build every level after the tasks)
LAYOUT = 3
LAYOUTS = (1, 2, 3)
# Masks and label images are uint8 (results.layout): class i is stored as the value i.
MAX_CLASSES = 256

State = Literal["computing", "finalising", "complete"]
# A result's life. "creating" has no entry: a store being created is built beside its path
# and renamed into place whole (results.store.prepare_result), so no reader ever sees it.
#   computing   at its path; blocks are written and recorded in _segpipe/tiles_done
#   finalising  every tile done; the pyramid and consolidated metadata are being written
#   complete    the last write of a run: everything reading needs is there
STATES: tuple[State, ...] = ("computing", "finalising", "complete")

# Identity keys added after the first release, oldest first. A stored identity lacking one was
# written before it existed: compared without it (results.store), so the result still resumes.
LATER_IDENTITY_KEYS = ("foreground_sha256", "source_sha256")


class IncompleteResultError(RuntimeError):
    """A result whose run has not finished (interrupted, or still running)."""


class ResultMismatchError(FileExistsError):
    """The output path holds something this run must not overwrite."""


@dataclass(frozen=True)
class ResultMeta:
    """What a result is (inputs, model, settings) and, read back, how its run went.

    Two runs with equal :meth:`identity` produce the same result, so one may finish the other's
    missing tiles: the identity holds the inputs and ``config``'s result settings, never its
    execution settings. ``config`` is the run's :class:`~segpipe.config.SegmentConfig` with
    ``window`` (blend mode) and ``amp`` resolved to what the run used.

    The provenance fields (``version`` .. ``summary``) are written by the store. ``state`` is
    the result's place in its life (see :data:`STATES`); ``complete`` is ``state ==
    "complete"``, kept as its own key on disk for readers of older results.
    """

    source: str
    shape: tuple[int, int]  # (y, x) pixels of the segmented level
    pixel_size_um: float | None  # at the segmented level
    class_names: tuple[str, ...]
    model_name: str
    model_sha256: str
    halo: int
    config: SegmentConfig = field(default_factory=SegmentConfig)
    crs: str | None = None  # georeferenced input: "EPSG:..." or WKT, and the segmented level's
    transform: tuple[float, ...] | None = None  # pixel-corner affine (a, b, c, d, e, f)
    foreground_sha256: str | None = None  # of the mask file, when config.foreground is one
    source_sha256: str | None = None  # of a sample of the source's pixels (io.identity)
    version: str | None = None
    state: State = "computing"
    started: str | None = None
    finished: str | None = None
    summary: RunSummary | None = None
    layout: int = LAYOUT  # where the arrays lie (see LAYOUTS); not part of the identity
    # (y, x) pixels of the source's level 0 (``shape`` is config.level's): None in results
    # written before it. Provenance, not identity, so those results still resume.
    source_shape: tuple[int, int] | None = None
    origin_um: tuple[float, float] | None = None  # (y, x) µm of the source's first pixel centre

    def __post_init__(self) -> None:
        px, box, at = self.pixel_size_um, self.transform, self.origin_um or (0.0, 0.0)
        if px is not None and not 0 < px < math.inf:
            raise ValueError(f"pixel_size_um {px!r} is not a positive number of microns")
        if box is not None and (len(box) != 6 or not all(map(math.isfinite, box))):
            raise ValueError(f"transform {box!r} is not six finite numbers (a, b, c, d, e, f)")
        if len(at) != 2 or not all(map(math.isfinite, at)):
            raise ValueError(f"origin_um {at!r} is not two finite numbers (y, x) of microns")
        if min(*self.shape, *(self.source_shape or ())) < 1:
            raise ValueError(f"shape {self.shape}, source_shape {self.source_shape}: no pixels")
        if len(self.class_names) > MAX_CLASSES:
            raise ValueError(
                f"model {self.model_name!r} has {len(self.class_names)} classes; a result's "
                f"mask is uint8 and holds at most {MAX_CLASSES}: segment with a model of "
                f"at most {MAX_CLASSES} classes"
            )

    @property
    def tile(self) -> int:
        """Output tile (and chunk) side, pixels."""
        return self.config.tile

    @property
    def complete(self) -> bool:
        """Whether the run finished: every tile, the pyramid and the metadata are written."""
        return self.state == "complete"

    @property
    def shard(self) -> int:
        """Shard side in pixels: one task's block of tiles."""
        return self.config.task_tiles * self.config.tile

    @property
    def class_areas_um2(self) -> tuple[float, ...] | None:
        """(C,) class areas of the finished run in square microns (None: unknown pixel size
        or unfinished run)."""
        if self.summary is None:
            return None
        return class_areas_um2(self.summary.class_pixels, self.pixel_size_um)

    def identity(self) -> dict[str, Any]:
        """The JSON that decides whether two runs make the same result.

        Its layout is the one results have carried since the first release (the knobs of
        blend mode and autocast under ``params``), so older results still resume.
        """
        c = self.config
        blend = {"window": c.window, "overlap": c.overlap, "sigma_scale": c.sigma_scale}
        params: dict[str, Any] = {**(blend if c.mode == "blend" else {}), "amp": c.amp}
        ident: dict[str, Any] = {
            "source": self.source,
            "shape": list(self.shape),
            "level": c.level,
            "pixel_size_um": self.pixel_size_um,
            "class_names": list(self.class_names),
            "model_name": self.model_name,
            "model_sha256": self.model_sha256,
            "tile": c.tile,
            "halo": self.halo,
            "mode": c.mode,
            "probability_dtype": c.probability_dtype,
            "params": params,
            "task_tiles": c.task_tiles,
            "min_level_size": c.min_level_size,
            "crs": self.crs,
            "transform": list(self.transform) if self.transform else None,
            # Results without a foreground mask, or of a source at 0, keep the identity they had.
            **({"foreground": c.foreground} if c.foreground != "none" else {}),
            **({"origin_um": list(at)} if any(at := self.origin_um or ()) else {}),
        }
        # Contents, not paths only: an input replaced must not resume or return the old result.
        sha = {"foreground_sha256": self.foreground_sha256, "source_sha256": self.source_sha256}
        ident.update({k: v for k, v in sha.items() if v is not None})
        return ident

    def to_attrs(self) -> dict[str, Any]:
        """The result's ``segpipe`` attribute: identity, provenance, the run's summary; flat keys
        (``model``, ``tile``, ``class_pixels``...) for readers with plain xarray or zarr."""
        attrs: dict[str, Any] = {
            "version": self.version,
            "complete": self.complete,
            "state": self.state,
            "identity": self.identity(),
            "config": self.config.as_dict(),
            "source": self.source,
            "source_shape": list(self.source_shape) if self.source_shape else None,
            "model": self.model_name,
            "model_sha256": self.model_sha256,
            "tile": self.config.tile,
            "halo": self.halo,
            "mode": self.config.mode,
            "pixel_size_um": self.pixel_size_um,
            "class_names": list(self.class_names),
            "started": self.started,
            "finished": self.finished,
            "layout": self.layout,
        }
        if self.summary is not None:
            s = self.summary
            attrs.update(
                {f.name: getattr(s, f.name) for f in fields(RunSummary)},
                class_pixels=list(s.class_pixels),
                # rounded on disk: six decimals say all a person reads there
                class_fraction=[round(f, 6) for f in s.class_fraction],
            )
            if (areas := self.class_areas_um2) is not None:
                attrs["class_area_um2"] = list(areas)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ResultMeta:
        """Parse a ``segpipe`` attribute, as written now or by earlier versions."""
        ident = attrs["identity"]
        params = ident.get("params") or {}
        if "config" in attrs:
            # A config written before the foreground setting: every tile was computed.
            stored = {"foreground": ident.get("foreground", "none"), **attrs["config"]}
            config = SegmentConfig.from_stored(stored)
        else:  # written before SegmentConfig: rebuild its result settings from the identity
            config = SegmentConfig(
                tile=int(ident["tile"]),
                mode=ident["mode"],
                window=params.get("window"),
                overlap=params.get("overlap", 0.25),
                sigma_scale=params.get("sigma_scale", 0.125),
                level=int(ident.get("level", 0)),
                probability_dtype=ident.get("probability_dtype", "float16"),
                task_tiles=int(ident.get("task_tiles", 1)),
                min_level_size=int(ident.get("min_level_size", 256)),
                amp=params.get("amp"),
                foreground=ident.get("foreground", "none"),
            )
        summary = RunSummary.from_attrs(attrs) if "tiles_total" in attrs else None
        transform, source_shape = ident.get("transform"), attrs.get("source_shape")
        origin = ident.get("origin_um")
        return cls(
            source=str(ident["source"]),
            shape=(int(ident["shape"][0]), int(ident["shape"][1])),
            pixel_size_um=ident.get("pixel_size_um"),
            class_names=tuple(ident["class_names"]),
            model_name=str(ident["model_name"]),
            model_sha256=str(ident["model_sha256"]),
            halo=int(ident["halo"]),
            config=config,
            crs=ident.get("crs"),
            transform=tuple(transform) if transform else None,
            foreground_sha256=ident.get("foreground_sha256"),
            source_sha256=ident.get("source_sha256"),
            version=attrs.get("version"),
            state=_state_of(attrs),
            started=attrs.get("started"),
            finished=attrs.get("finished"),
            summary=summary,
            layout=layout_of(attrs),
            source_shape=(int(source_shape[0]), int(source_shape[1])) if source_shape else None,
            origin_um=(float(origin[0]), float(origin[1])) if origin else None,
        )


def stored_complete(attrs: Mapping[str, Any]) -> bool:
    """Whether a result's ``segpipe`` attribute calls it complete: ``complete`` JSON true (not
    a truthy string) and no other state named: one of the two edited alone is no finished run."""
    return attrs.get("complete") is True and attrs.get("state") in (None, "", "complete")


def _state_of(attrs: Mapping[str, Any]) -> State:
    complete = attrs.get("complete") is True
    state = attrs.get("state") or ("complete" if complete else "computing")
    if state not in STATES:
        raise ValueError(f"unknown result state {state!r}; the states are {STATES}")
    # ``complete`` is what every reader checks; a result it does not call complete is not.
    return "finalising" if state == "complete" and not complete else state


def is_result(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a segpipe result (complete or not): :func:`read_attrs` reads it.
    Anything else (a ``zarr.json`` of no Zarr group too) is never overwritten or deleted."""
    try:
        read_attrs(path)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    return True


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The raw ``segpipe`` attribute of a result, as stored (JSON). Raises ``FileNotFoundError``
    (nothing there) or ``ValueError`` naming ``path`` (no result, or no Zarr group metadata)."""
    return _result_attrs(path, _group_attrs(path))


def _result_attrs(path: str | os.PathLike, group_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``segpipe`` attribute among a group's ``group_attrs``; a ValueError where it is
    no result's. An ingested image carries one too (kind "image"); a result has an identity.
    Only a result may ever be overwritten."""
    attrs = group_attrs.get("segpipe")
    if not isinstance(attrs, dict) or not isinstance(attrs.get("identity"), dict):
        why = "no 'segpipe' result attribute: an ingested image or other data"
        raise ValueError(f"{path} is a Zarr group but not a segpipe result ({why})")
    return dict(attrs)


def _group_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The attributes of the Zarr group at ``path``; for a ``zarr.json`` that is no JSON, JSON of
    another shape (``[]``, ``5``) or an array's, one ValueError naming it, not Zarr's three."""
    try:
        return zarr.open_group(path, mode="r").attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise FileNotFoundError(f"no segpipe result at {path}") from e
    except (AttributeError, TypeError, ValueError) as e:
        why = f"its zarr.json is no Zarr group metadata ({type(e).__name__}: {e})"
        raise ValueError(f"{path} is no segpipe result: {why}; if damaged, move it away") from e


def read_meta(path: str | os.PathLike) -> ResultMeta:
    """The typed metadata of the result at ``path`` (provenance, settings, ``complete``)."""
    return parse_meta(path, read_attrs(path))


def open_root(path: str | os.PathLike, mode: Literal["r", "r+"]) -> tuple[zarr.Group, ResultMeta]:
    """The root group of the result at ``path``, opened in ``mode``, and its metadata."""
    root = zarr.open_group(store_of(path), mode=mode)
    return root, parse_meta(path, cast(Mapping[str, Any], root.attrs["segpipe"]))


def parse_meta(path: str | os.PathLike, attrs: Mapping[str, Any]) -> ResultMeta:
    """:meth:`ResultMeta.from_attrs`, its error naming the result at ``path``."""
    try:
        return ResultMeta.from_attrs(attrs)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable segpipe metadata ({type(e).__name__}: {e})") from e


def store_of(path: str | os.PathLike) -> Any:
    """What Zarr opens: a local path as a string, a URLPath (its store and options) as it is."""
    return path if isinstance(path, URLPath) else os.fspath(path)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether the result at ``path`` exists and its last tile was written."""
    try:
        return stored_complete(read_attrs(path))
    except (FileNotFoundError, ValueError):
        return False


def layout_of(attrs: Mapping[str, Any]) -> int:
    """The layout of a result from its ``segpipe`` attribute (1 when it does not say).

    >>> layout_of({}), layout_of({"layout": 2})
    (1, 2)
    """
    layout = attrs.get("layout", 1)
    if layout not in LAYOUTS:
        raise ValueError(
            f"result layout {layout!r} is unknown to segpipe {__version__} (it reads layouts "
            f"{', '.join(map(str, LAYOUTS))}); the result was written by a newer segpipe: "
            "upgrade segpipe to read it"
        )
    return int(layout)


def level_path(level: int, name: str = "", *, layout: int = LAYOUT) -> str:
    """Where pyramid ``level`` (or its array ``name``) lies inside a result of ``layout``.

    >>> level_path(0), level_path(2, "mask")
    ('0', '2/mask')
    >>> level_path(0, layout=1), level_path(0, "mask", layout=1), level_path(2, layout=1)
    ('', 'mask', 'levels/2')
    """
    group = str(level) if layout >= 2 else ("" if level == 0 else f"levels/{level}")
    return f"{group}/{name}".strip("/")


def label_path(name: str, level: int | None = None, *, layout: int = LAYOUT) -> str:
    """Where label image ``name`` (``level`` None) or its array at ``level`` lies.

    OME-Zarr keeps label images under ``labels/``, one group each; layout 2 gives each level
    its own group, named after the image's level, holding one array named after the label.

    >>> label_path("mask"), label_path("mask", 1), label_path("mask", 1, layout=1)
    ('labels/mask', 'labels/mask/1/mask', 'labels/mask/1')
    """
    group = f"labels/{name}"
    if level is None:
        return group
    return f"{group}/{level}/{name}" if layout >= 2 else f"{group}/{level}"


def result_levels(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(y, x) pixels of every pyramid level of the result at ``path``, level 0 first.

    The number of levels is what the store's OME metadata lists (one, for a result written
    before results had pyramids).
    """
    attrs = _group_attrs(path)
    shape = parse_meta(path, _result_attrs(path, attrs)).shape
    try:
        datasets = attrs.get("ome", {}).get("multiscales", [{}])[0].get("datasets", [None])
        return list(pyramid_shapes(shape, 1)[: len(datasets)])
    except (AttributeError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable OME metadata ({type(e).__name__}: {e})") from e
