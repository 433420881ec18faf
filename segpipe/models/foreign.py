"""TorchScript and ``torch.export`` files as segpipe models, described by a sidecar.

A network trained anywhere can be segmented with by path once it is saved as TorchScript
(``torch.jit.save``) or as an exported program (``torch.export.save``, with dynamic batch,
height and width dimensions: the last batch of a run may be smaller, and windows vary in
size) and described by a sidecar beside it, ``<file>.json`` (or ``<file>.yaml``)::

    {
      "class_names": ["background", "nucleus"],          required
      "in_channels": 1,                                  default: the contract's, else measured
      "geometry": {"halo": 44, "multiple": 16},          default: measured; keys left out too
      "input_mean": [0.5], "input_std": [0.25],          default: 0 and 1 (none)
      "pixel_contract": {"channels": 1, "dtype": "uint16", "scaling": "range",
                         "lo": [0], "hi": [4095], "pixel_size_um": 0.65}
    }

:func:`write_sidecar` writes one. Such files hold code (TorchScript's own, not Python pickles);
segpipe runs it only for a file that has a sidecar, i.e. that its user declared a model. A plain
checkpoint (:mod:`segpipe.models.checkpoint`) still never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segpipe.geometry.tiling import Geometry
from segpipe.models.contract import PixelContract
from segpipe.models.torchfile import bytes_before
from segpipe.models.wrapped import SavedModule, WrappedModel, wrap

__all__ = ["SIDECAR_SUFFIXES", "is_foreign", "load_foreign", "sidecar_of", "write_sidecar"]

SIDECAR_SUFFIXES = (".json", ".yaml", ".yml")
# Geometries measured in this process, by the model file's bytes and its sidecar: measuring runs
# the network through many probes (a minute for a small traced U-Net on a CPU), and a script
# segmenting image after image by the file's path loads it each time.
_MEASURED: dict[tuple[str, str], Geometry] = {}
_KEYS = {"format", "class_names", "in_channels", "geometry", "input_mean", "input_std",
         "pixel_contract"}  # fmt: skip


def sidecar_of(path: str | os.PathLike[str]) -> Path | None:
    """The sidecar of a model file (``model.pt`` -> ``model.pt.json``), None when it has none."""
    p = Path(path)
    for suffix in SIDECAR_SUFFIXES:
        candidate = p.with_name(p.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def is_foreign(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file with a sidecar (to be loaded by :func:`load_foreign`)."""
    return Path(path).is_file() and sidecar_of(path) is not None


def write_sidecar(
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str],
    in_channels: int | None = None,
    geometry: Geometry | None = None,
    input_mean: Sequence[float] | float | None = None,
    input_std: Sequence[float] | float | None = None,
    pixel_contract: PixelContract | None = None,
) -> Path:
    """Write ``<path>.json`` describing the TorchScript or exported model at ``path``."""
    data: dict[str, Any] = {"class_names": [str(c) for c in class_names]}
    if in_channels is not None:
        data["in_channels"] = int(in_channels)
    if geometry is not None:
        data["geometry"] = {
            "halo": geometry.halo,
            "multiple": geometry.multiple,
            "input_offset": geometry.input_offset,
            "shrinks": geometry.shrinks,
        }
    for key, value in (("input_mean", input_mean), ("input_std", input_std)):
        if value is not None:
            # Any array-like (a list, a numpy array, a CPU tensor) becomes a JSON list.
            array = np.asarray(value, dtype=float)
            data[key] = array.ravel().tolist() if array.ndim else float(array)
    if pixel_contract is not None:
        data["pixel_contract"] = pixel_contract.as_dict()
    out = Path(path)
    out = out.with_name(out.name + ".json")
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out


def load_foreign(path: str | os.PathLike[str]) -> WrappedModel:
    """A TorchScript or ``torch.export`` file with its sidecar, as a :class:`WrappedModel`.

    Raises ValueError naming the file when the sidecar is missing or malformed, or the file
    is neither format.
    """
    p = Path(path)
    side = sidecar_of(p)
    if side is None:
        raise ValueError(
            f"{p} has no sidecar ({p.name}.json): write one with segpipe.models.write_sidecar "
            "(class_names, and optionally geometry and pixel_contract)"
        )
    spec = _read_sidecar(side)
    module, saved = _load_module(p, spec.get("format"))
    geometry, measured = _geometry(side, spec.get("geometry"))
    key = None
    if geometry is None:  # to be measured: the file's bytes hashed only then
        key = (
            hashlib.sha256(saved.data).hexdigest(),
            json.dumps(spec, sort_keys=True, default=str),
        )
        geometry = _MEASURED.get(key)  # checked against the module all the same
    contract = None
    if spec.get("pixel_contract") is not None:
        try:
            contract = PixelContract.from_dict(spec["pixel_contract"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{side}: pixel_contract is not valid: {err}") from err
    try:
        net = wrap(
            module,
            class_names=[str(c) for c in spec["class_names"]],
            in_channels=spec.get("in_channels"),
            geometry=geometry,
            **measured,
            input_mean=spec.get("input_mean"),
            input_std=spec.get("input_std"),
            pixel_contract=contract,
        )
    except Exception as err:  # the module's own code raises anything (a guard: AssertionError)
        raise ValueError(f"{p} (sidecar {side}): {_failure(err, saved)}") from err
    net.saved = saved  # what it pickles as: an exported module does not pickle
    if key is not None:
        _MEASURED[key] = net.geometry
    return net


def _failure(err: Exception, saved: SavedModule) -> str:
    """``err`` as words: segpipe's own checks as they are, the module's failures (measuring
    runs it at sizes of its own) with their type and, for an exported program, the fix."""
    if isinstance(err, ValueError | TypeError):
        return str(err)
    text = f"the module failed on segpipe's probe input: {type(err).__name__}: {err}"
    if saved.kind == "torch.export":
        # Exported with example inputs only, its height and width are fixed at theirs.
        text += (
            "; an exported program must take any height and width: export it with dynamic "
            "ones (dynamic_shapes with torch.export.Dim), or give a geometry in the sidecar"
        )
    return text


def _geometry(side: Path, given: Any) -> tuple[Geometry | None, dict[str, Any]]:
    """The sidecar's geometry when it is whole; else the halo or multiple it gives, for
    :func:`wrap` to keep while it measures the rest (not defaults, which tile wrongly)."""
    if given is None:
        return None, {}
    if isinstance(given, Mapping):
        _check_geometry_types(side, given)
    if isinstance(given, Mapping) and not {"halo", "multiple"} <= set(given):
        extra = sorted(set(given) - {"halo", "multiple"})
        if extra:
            raise ValueError(
                f"{side}: geometry {dict(given)!r} gives {extra} without both halo and multiple; "
                "give all of them, or only halo or multiple (the rest is measured)"
            )
        return None, dict(given)
    try:
        return Geometry(**given), {}
    except (TypeError, ValueError) as err:  # Geometry's own checks name no file
        raise ValueError(f"{side}: geometry {given!r} is not valid: {err}") from err


def _check_geometry_types(side: Path, given: Mapping[str, Any]) -> None:
    """Refuse a sidecar geometry entry of the wrong type: halo 2.5 failed later in torch
    (a float tensor size), and JSON's ``true`` passed as a halo of 1 pixel."""
    for key, value in given.items():
        if key == "shrinks":
            if not isinstance(value, bool):
                raise ValueError(
                    f"{side}: geometry shrinks {value!r} is not true or false (whether the "
                    "output is input - 2 * halo pixels a side)"
                )
        # bool is an int in Python: true would be a halo of 1 pixel.
        elif key in ("halo", "multiple", "input_offset") and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise ValueError(
                f"{side}: geometry {key} {value!r} is not a whole number of pixels; give an "
                "integer (2, not 2.5 or true)"
            )
        elif key in ("halo", "multiple") and value < (1 if key == "multiple" else 0):
            least = "1" if key == "multiple" else "0"
            raise ValueError(f"{side}: geometry {key} {value!r} must be >= {least} pixels")


def _read_sidecar(side: Path) -> dict[str, Any]:
    # json.JSONDecodeError and UnicodeDecodeError (not a text file) are ValueErrors; YAML's are not.
    errors: tuple[type[Exception], ...] = (ValueError,)
    parse: Callable[[str], Any] = json.loads
    if side.suffix != ".json":
        import yaml  # type: ignore[import-untyped]

        parse, errors = yaml.safe_load, (ValueError, yaml.YAMLError)
    try:
        data = parse(side.read_text(encoding="utf-8"))
    except errors as err:
        raise ValueError(f"{side}: not a readable sidecar: {err}") from err
    if not isinstance(data, Mapping) or not data.get("class_names"):
        raise ValueError(f"{side}: a sidecar is a mapping with at least class_names")
    names = data["class_names"]
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        # A bare string would pass as a sequence of one-letter names.
        raise ValueError(
            f"{side}: class_names {names!r} is not a list of strings: give one name per "
            'output channel, e.g. ["background", "tumor"]'
        )
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ValueError(f"{side}: unknown entries {unknown}; known: {sorted(_KEYS)}")
    return dict(data)


def _load_module(path: Path, declared: str | None) -> tuple[torch.nn.Module, SavedModule]:
    kind = declared or _sniff(path)
    if kind not in ("torchscript", "torch.export"):
        raise ValueError(
            f"{path}: format {kind!r} is neither 'torchscript' nor 'torch.export'; a segpipe "
            "checkpoint needs no sidecar (remove it)"
        )
    data = path.read_bytes()
    # torch's loaders take a damaged archive without a check: a flipped bit loads another
    # network without a word, or kills the process (SIGSEGV). Each entry's CRC says.
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad, prepended = z.testzip(), bytes_before(z)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # a central dir torn
        raise ValueError(
            f"{path}: not a readable {kind} file (damaged or truncated): {err}"
        ) from err
    if bad is not None:
        raise ValueError(f"{path}: damaged: its entry {bad!r} fails its CRC check")
    if prepended:
        raise ValueError(
            f"{path}: its zip archive starts {prepended:,} bytes into the file (two files "
            f"joined?), so torch would read other bytes than the ones checked"
        )
    saved = SavedModule(data, kind)
    try:
        return saved.load(), saved
    except Exception as err:  # torch's loaders raise anything (IndexError, MemoryError, ...)
        raise ValueError(
            f"{path}: cannot be loaded as {kind}: {type(err).__name__}: {err}"
        ) from err


def _sniff(path: Path) -> str:
    """``"torchscript"`` or ``"torch.export"`` from the zip archive's entries.

    Both put everything under one top folder. TorchScript has ``code/`` (its Python-like
    source, in folders named after the network's packages: ``code/__torch__/timm/models/...``)
    and ``constants.pkl``; an exported program has ``archive_format`` and ``models/``.
    """
    try:
        with zipfile.ZipFile(path) as z:
            tops = {tuple(n.split("/")[1:2]) for n in z.namelist()}
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a TorchScript or torch.export file: {err}") from err
    if {("code",), ("constants.pkl",)} <= tops:
        return "torchscript"
    if ("archive_format",) in tops or ("models",) in tops:
        return "torch.export"
    return "unknown"
