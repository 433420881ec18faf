"""``SegmentConfig``: every setting of a segmentation run, typed, validated, in one place.

The settings fall in two groups, marked on each field:

- **result** settings change the numbers a run writes (tile grid, stitching mode, level, the
  stored dtype, the shard and pyramid layout, autocast). They are part of a result's identity:
  a re-run with other result settings is another result.
- **execution** settings change only how the numbers are computed (batch size, device, workers,
  scheduler); a run resumed with other execution settings finishes the same result. They can
  change the last bits of float probabilities (thread counts and batch shapes change the order
  of float sums in the convolutions), so bit-identity holds between runs with equal execution
  settings; masks agree except where two classes tie to float rounding.

The CLI, the flows, the archive and :func:`segpipe.segment` all take one ``SegmentConfig``, and
the CLI builds its options from these fields: a new setting is added here and reaches every
entry point.

>>> config = SegmentConfig(tile=256, mode="blend")
>>> config.replace(batch_size=8).batch_size
8
>>> sorted(config.result_settings())[:3]
['amp', 'foreground', 'level']
>>> SegmentConfig(tile=0)
Traceback (most recent call last):
...
ValueError: SegmentConfig.tile must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["EXECUTION", "PROBABILITY_DTYPES", "RESULT", "SegmentConfig", "setting_help", "settings"]

PROBABILITY_DTYPES = ("float16", "float32", "uint8")
_MODES = ("exact", "blend")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# 'sync', or an address Dask connects to: scheme://location, or host:port (a TCP default)
_SCHEDULER = re.compile(r"^(sync|[a-z][a-z0-9+.-]*://\S+|\S+:\d+)$")

RESULT = "result"
EXECUTION = "execution"


def _setting(default: Any, kind: str, help: str, *, flag: str | None = None) -> Any:
    # The metadata is what the CLI builds its options from (flag name and help text).
    return field(default=default, metadata={"kind": kind, "help": help, "flag": flag})


@dataclass(frozen=True, kw_only=True)
class SegmentConfig:
    """The settings of a segmentation run (see the module doc for the two groups)."""

    # --- result settings: part of the result's identity ---
    tile: int = _setting(
        512,
        RESULT,
        "output tile side in pixels, also the result's chunk side; a multiple of the model's "
        "size multiple",
    )
    mode: Literal["exact", "blend"] = _setting(
        "exact",
        RESULT,
        "'exact': overlap-tile with the model's halo, equal to a whole-image pass; 'blend': "
        "Gaussian-weighted sliding windows",
    )
    window: int | None = _setting(
        None,
        RESULT,
        "blend mode: window output side in pixels (default: tile // 2, snapped to the model)",
    )
    overlap: float = _setting(0.25, RESULT, "blend mode: fraction of a window its neighbour shares")
    sigma_scale: float = _setting(
        0.125, RESULT, "blend mode: Gaussian sigma as a fraction of the window"
    )
    level: int | None = _setting(
        None,
        RESULT,
        "pyramid level of the image to segment (0 = full resolution); default: the level "
        "closest to the model's training pixel size, else 0",
    )
    pixel_size_um: float | None = _setting(
        None,
        RESULT,
        "microns per pixel at level 0, overriding what the file says",
        flag="--pixel-size",
    )
    probability_dtype: Literal["float16", "float32", "uint8"] = _setting(
        "float16",
        RESULT,
        "stored probability dtype: float16 (~5e-4 rounding), float32, or uint8 (steps of 1/255, "
        "CF scale_factor)",
    )
    task_tiles: int = _setting(
        2,
        RESULT,
        "tiles per Dask task along each side; one task writes one Zarr shard of "
        "task_tiles * tile pixels",
    )
    min_level_size: int = _setting(
        256,
        RESULT,
        "the result's pyramid halves while its smaller side stays >= this many pixels",
    )
    amp: bool | None = _setting(
        None,
        RESULT,
        "autocast the forward pass (bfloat16 where the GPU supports it); default: on CUDA only",
    )
    foreground: str = _setting(
        "auto",
        RESULT,
        "tiles to compute: 'tissue' (stained tissue of a brightfield slide), 'nodata' (valid "
        "pixels of a raster), a mask file (image: nonzero = compute; GeoJSON polygons in "
        "level-0 pixels), 'none' (every tile); 'auto': tissue for RGB slides with a pixel "
        "size, nodata where the image declares one, else none. Tiles left out read as class 0",
    )

    # --- execution settings: never change the numbers ---
    batch_size: int = _setting(
        4,
        EXECUTION,
        "windows per forward pass (on the CPU, windows small enough to run side by side, a "
        "pass per core, go one per pass)",
    )
    device: str = _setting(
        "auto", EXECUTION, "'auto' (CUDA when present), 'cpu', 'cuda[:N]', 'mps'"
    )
    n_workers: int | None = _setting(
        None,
        EXECUTION,
        "workers of the local Dask cluster (default: from the cores or GPUs; on one GPU, the "
        "worker processes sharing it)",
        flag="--workers",
    )
    scheduler: str | None = _setting(
        None,
        EXECUTION,
        "Dask scheduler: a running one's address (tcp://host:8786) or 'sync' for this process; "
        "when unset, the distributed client active in this process, else "
        "DASK_SCHEDULER_ADDRESS (dask config scheduler-address), else a local cluster",
    )
    threads: int | None = _setting(
        None,
        EXECUTION,
        "torch intra-op threads of each CPU worker (default: a local cluster's share of the "
        "cores; a running cluster's workers keep their own); equal counts give equal bits "
        "on CPUs",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            # numpy's numbers (np.int64 from a shape, np.float32 from an array) are taken as
            # the Python number they equal: the stored config is JSON
            value = getattr(self, f.name)
            if isinstance(value, bool) or type(value) in (int, float):
                continue
            if isinstance(value, os.PathLike):  # a mask file's Path: stored as its string
                object.__setattr__(self, f.name, os.fspath(value))
            if isinstance(value, numbers.Integral):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, numbers.Real):
                object.__setattr__(self, f.name, float(value))
        for name in ("tile", "task_tiles", "min_level_size", "batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.level is not None:
            _check_int("level", self.level, minimum=0)
        for name in ("window", "n_workers", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_choice("mode", self.mode, _MODES)
        _check_choice("probability_dtype", self.probability_dtype, PROBABILITY_DTYPES)
        if not (_is_number(self.overlap) and 0 <= self.overlap < 1):
            raise ValueError(f"SegmentConfig.overlap must be in [0, 1), got {self.overlap!r}")
        sigma = self.sigma_scale
        if not (_is_number(sigma) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"SegmentConfig.sigma_scale must be finite and > 0, got {sigma!r}")
        px = self.pixel_size_um
        if px is not None and not (_is_number(px) and math.isfinite(px) and px > 0):
            raise ValueError(
                f"SegmentConfig.pixel_size_um must be a positive number of microns, got {px!r}"
            )
        if self.amp is not None and not isinstance(self.amp, bool):
            raise ValueError(f"SegmentConfig.amp must be True, False or None, got {self.amp!r}")
        if not (isinstance(self.device, str) and _DEVICE.match(self.device)):
            raise ValueError(
                f"SegmentConfig.device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got "
                f"{self.device!r}"
            )
        if not (isinstance(self.foreground, str) and self.foreground.strip()):
            raise ValueError(
                "SegmentConfig.foreground must be 'auto', 'tissue', 'nodata', 'none' or a mask "
                f"file's path, got {self.foreground!r}"
            )
        if self.scheduler is not None and not (
            isinstance(self.scheduler, str) and _SCHEDULER.match(self.scheduler)
        ):
            # Dask's own refusal names no setting, after a minute's wait for the address
            raise ValueError(
                "SegmentConfig.scheduler must be a running scheduler's address "
                f"(tcp://host:8786, host:8786), 'sync' or None, got {self.scheduler!r}; pass a "
                "running distributed.Client to segment(scheduler=...) instead"
            )

    def ignored_settings(self) -> tuple[str, ...]:
        """The settings away from their defaults that this ``mode`` does not use (blend's
        window, overlap and sigma_scale in exact mode): a run refuses them rather than
        record settings that changed nothing."""
        if self.mode != "exact":
            return ()
        default = SegmentConfig()
        blend = ("window", "overlap", "sigma_scale")
        return tuple(name for name in blend if getattr(self, name) != getattr(default, name))

    # --- construction and views -------------------------------------------------------------

    def replace(self, **changes: Any) -> SegmentConfig:
        """A copy with ``changes`` applied (validated; unknown names are refused)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentConfig:
        """Parse a mapping (JSON, Prefect parameters); unknown names are refused."""
        _check_names(data)
        return cls(**dict(data))

    def as_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready."""
        return dataclasses.asdict(self)

    def result_settings(self) -> dict[str, Any]:
        """The settings that change the numbers: part of a result's identity."""
        return {f.name: getattr(self, f.name) for f in settings(RESULT)}

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> SegmentConfig:
        """:meth:`from_dict` of the config a result stores: an execution setting that an
        earlier release let through and this one refuses (``threads`` 0, -1 or 2.5) is left
        at its default, as it never changed the numbers. Result settings must be valid."""
        kept = dict(data)
        for f in settings(EXECUTION):
            try:
                cls.from_dict({f.name: kept[f.name]} if f.name in kept else {})
            except ValueError:
                del kept[f.name]
        return cls.from_dict(kept)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        # Prefect (pydantic) validates a flow's config parameter. Its lax parsing of each field
        # ("256" -> 256, True -> 1.0 µm) came before these checks and let through what they
        # refuse: a mapping goes through from_dict, as everywhere else.
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls._from_parameter,
            json_schema_input_schema=handler(source),  # the fields, for a deployment's form
            serialization=core_schema.plain_serializer_function_ser_schema(cls.as_dict),
        )

    @classmethod
    def _from_parameter(cls, value: Any) -> SegmentConfig:
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ValueError(f"config must be a SegmentConfig or a mapping of settings, got {value!r}")

    def execution_settings(self) -> dict[str, Any]:
        """The settings that change only how the numbers are computed."""
        return {f.name: getattr(self, f.name) for f in settings(EXECUTION)}


def settings(kind: str | None = None) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of :class:`SegmentConfig`, all or those of one ``kind``
    (``"result"`` or ``"execution"``)."""
    return tuple(
        f for f in dataclasses.fields(SegmentConfig) if kind is None or f.metadata["kind"] == kind
    )


def setting_help(name: str) -> str:
    """The one-line help of setting ``name`` (what the CLI shows)."""
    return str({f.name: f.metadata["help"] for f in settings()}[name])


def _check_names(data: Mapping[str, Any]) -> None:
    known = {f.name for f in settings()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown segment setting(s) {', '.join(map(repr, unknown))}; the settings are: "
            f"{', '.join(sorted(known))}"
        )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"SegmentConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"SegmentConfig.{name} must be >= {minimum}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SegmentConfig.{name} must be one of {choices}, got {value!r}")


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (``True`` would be 1 µm, a 1.0 overlap)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
