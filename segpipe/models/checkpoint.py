"""Checkpoint files: a model's name, config, classes, normalisation and weights, nothing else.

A checkpoint is ``torch.save`` of a plain dict (see :func:`save`) and is read back with
``torch.load(..., weights_only=True)``: loading never unpickles code, so a checkpoint from
anywhere can be opened without running it. ``torch.save`` writes a zip archive whose entries carry
CRC-32 checksums that ``torch.load`` never checks; :func:`load` checks them, so a file damaged
on disk or in transfer is refused instead of loading as a different model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segpipe.atomic import replaced_file
from segpipe.models.base import REGISTRY, SegmentationModel, code_of, is_registered
from segpipe.models.contract import PixelContract
from segpipe.models.torchfile import CheckpointError, read_payload
from segpipe.models.wrapped import WrappedModel

__all__ = ["FORMAT", "CheckpointError", "fingerprint", "load", "read_payload", "save"]

FORMAT = "segpipe-checkpoint/1"


def save(
    model: SegmentationModel,
    path: str | os.PathLike[str],
    *,
    metrics: Mapping[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` to ``path`` (a local file, replaced whole: written beside it, then
    renamed over it) and return the path.

    The file holds ``{"format", "name", "config", "class_names", "input_mean", "input_std",
    "state_dict", "metrics", "weights_dtype"}`` and, for a model that has one, its
    ``"pixel_contract"`` (:meth:`PixelContract.as_dict`). ``metrics`` (validation scores, training
    facts) must be plain numbers, strings, booleans, None, lists and str-keyed dicts, so
    ``weights_only`` loading can read them. ``half=True`` stores floating-point weights as
    float16 (half the file size; :func:`load` restores float32), at a rounding error of about
    1e-3 relative per weight.
    """
    if not isinstance(model, SegmentationModel):
        raise TypeError(
            f"save() takes a segpipe SegmentationModel, got {type(model).__name__}; build one "
            "with segpipe.models.build()"
        )
    if not is_registered(model):
        parent = REGISTRY.get(model.name)
        raise TypeError(
            f"save() writes registry architectures only: {type(model).__qualname__} "
            + (f"subclasses {parent.__qualname__} and would load back as that" if parent
               else f"({model.name!r}) is not one")
            + ". A checkpoint never carries code: save it as TorchScript or torch.export with a "
            "JSON sidecar (segpipe.models.write_sidecar), or register it under a name of its own "
            "(segpipe.models.base.register) in a module imported before loading"
        )  # fmt: skip
    if "://" in os.fspath(path):
        # Path() would make "s3://b/m.pt" the local folders s3:/b.
        raise ValueError(f"{os.fspath(path)} not written: save() writes local files only")
    path = Path(path)
    contract = model.pixel_contract
    # load() refuses both; refused here, before anything is written.
    if contract is not None and contract.channels != model.in_channels:
        raise ValueError(
            f"{path} not written: the model's pixel contract names {contract.channels} "
            f"channels, the model takes {model.in_channels}; give it a matching one"
        )
    weights_dtype = torch.float16 if half else torch.float32
    state_dict = {}
    for key, t in model.state_dict().items():
        stored = t.detach().to("cpu", weights_dtype) if t.is_floating_point() else t.detach().cpu()
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            why = (
                f"reaches {float(t.abs().max()):g}, beyond float16's 65504: save with half=False"
                if bool(torch.isfinite(t).all())
                else "holds NaN or infinite values (did training diverge?)"
            )
            raise ValueError(f"{path} not written: weight {key!r} {why}")
        state_dict[key] = stored.clone().contiguous()
    payload = {
        "format": FORMAT,
        "name": model.name,
        "config": dataclasses.asdict(model.config),
        "class_names": list(model.class_names),
        "input_mean": list(model.input_mean),
        "input_std": list(model.input_std),
        "state_dict": state_dict,
        "metrics": _plain(dict(metrics or {}), "metrics"),
        "weights_dtype": str(weights_dtype).removeprefix("torch."),
    }
    if model.pixel_contract is not None:
        payload["pixel_contract"] = model.pixel_contract.as_dict()
    try:  # readers of the old file never see a half-written one, nor a failed save a loss
        with replaced_file(path) as part:
            torch.save(payload, part)
    except RuntimeError as err:  # torch's writer reports a full disk so (OSErrors name path)
        raise CheckpointError(f"{path} cannot be written: {err}") from err
    return path


def load(path: str | os.PathLike[str]) -> SegmentationModel:
    """Read a checkpoint written by :func:`save`; return the model in eval mode.

    ``model.checkpoint_metrics`` holds the metrics stored with it. Raises
    :class:`CheckpointError` (a ValueError) naming the file when it cannot be read, is cut
    short or damaged (a zip entry fails its CRC check), is not a segpipe checkpoint, holds
    pickled Python objects, names an unknown model, has non-finite input statistics, or its
    config or weights (shapes, dtypes, values) do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    payload = read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a segpipe checkpoint: expected format {FORMAT!r}, found {found!r}. "
            "Write checkpoints with segpipe.models.save()."
        )
    entries = {"name", "config", "class_names", "input_mean", "input_std", "state_dict"}
    if missing := entries - set(payload):
        raise CheckpointError(f"{path} lacks the entries {sorted(missing)}")
    name = payload["name"]
    if not isinstance(name, str) or name not in REGISTRY:
        raise CheckpointError(
            f"{path} holds a model named {name!r}, which this segpipe does not know; "
            f"known models: {sorted(REGISTRY)}"
        )
    cls = REGISTRY[name]
    state = payload["state_dict"]
    tensors = all(  # a sparse or meta tensor fails every check after this one
        isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_meta
        for v in (state.values() if isinstance(state, dict) else ())
    )
    if not isinstance(state, dict) or not tensors or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            f"{path}: its state_dict is a {type(state).__name__}, not a dict of named dense tensors"
        )
    metrics = payload.get("metrics")
    if not isinstance(metrics, dict | None):
        raise CheckpointError(f"{path}: its metrics are a {type(metrics).__name__}, not a dict")
    weights_dtype = _weights_dtype(payload.get("weights_dtype"), path)
    for what in ("input_mean", "input_std"):
        _check_statistic(what, payload[what], path)
    if not isinstance(names := payload["class_names"], list | tuple | None) or any(
        not isinstance(c, str) for c in names or ()
    ):  # a bare string would be one name a letter
        raise CheckpointError(f"{path}: its class_names {names!r} are not a list of names")

    def build() -> SegmentationModel:
        return cls(
            cls.config_class(**payload["config"]),
            class_names=payload["class_names"],
            input_mean=payload["input_mean"],
            input_std=payload["input_std"],
        )

    try:
        # Names and shapes first, on the meta device (nothing allocated): a config that lies
        # about its size (width=200000, 300 layers) is refused here, not by the allocator.
        with torch.device("meta"):
            skeleton = build()
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # sizes overflowing
        raise CheckpointError(
            f"{path}: its config {payload['config']} does not fit model {name!r} "
            f"({cls.config_class.__name__}): {err}"
        ) from err
    _check_tensors(skeleton, state, weights_dtype, path)
    _check_finite(state, path)
    model = build()
    config = model.config
    try:
        # load_state_dict copies into the float32 parameters, so float16 files come back float32.
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: its weights do not match a {name!r} model with config {config}: {err}"
        ) from err
    model.checkpoint_metrics = dict(metrics or {})
    model.pixel_contract = _contract(payload.get("pixel_contract"), model.in_channels, path)
    return model.eval()


def _contract(data: Any, channels: int, path: Path) -> PixelContract | None:
    """The checkpoint's pixel contract; None for files written before contracts existed."""
    if data is None:
        return None
    try:
        contract = PixelContract.from_dict(data)
    except (TypeError, ValueError, OverflowError) as err:  # OverflowError: 10**400 as float
        raise CheckpointError(f"{path}: its pixel contract {data!r} is not valid: {err}") from err
    if contract.channels != channels:
        raise CheckpointError(
            f"{path}: its pixel contract names {contract.channels} channels, its model takes "
            f"{channels}"
        )
    return contract


def _weights_dtype(value: Any, path: Path) -> torch.dtype | None:
    """The dtype the file says its floating-point weights have; None if it does not say."""
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"{path}: its weights_dtype {value!r} is not a floating-point dtype "
            "(segpipe.models.save writes 'float32' or 'float16')"
        )
    return dtype


def _check_statistic(what: str, value: Any, path: Path) -> None:
    values = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{path}: its {what} {value!r} is not a number or list of numbers")
    if not all(-1e300 < v < 1e300 for v in values):  # an int past float's range is refused
        raise CheckpointError(f"{path}: its {what} {value!r} holds NaN or infinite values")
    if what == "input_std" and not all(v > 0 for v in values):
        raise CheckpointError(f"{path}: its input_std {value!r} must be > 0 for every channel")


def _check_finite(state: Mapping[str, Any], path: Path) -> None:
    for key, tensor in state.items():
        floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        if floating and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path}: weight {key!r} holds NaN or infinite values; the checkpoint is "
                "damaged or its training diverged"
            )


def _check_tensors(
    skeleton: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    weights_dtype: torch.dtype | None,
    path: Path,
) -> None:
    """The weights the config gives, of its shapes; floating-point ones of ``weights_dtype``
    (any float when the file does not say), others of the model's own dtype. load_state_dict
    would cast an int64 or mislabelled tensor into the float32 parameters without a word."""
    reference = skeleton.state_dict()
    odd = [f"missing {k!r}" for k in reference if k not in state]  # in the model's order
    if odd := odd + [f"unexpected {k!r}" for k in state if k not in reference]:
        raise CheckpointError(
            f"{path}: its weights do not match its config, which gives {len(reference)} weight "
            f"tensors; the file holds {len(state)} ({len(odd)} differ: {', '.join(odd[:3])})"
        )
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: its config does not match its weights ({len(wrong)} tensors differ, "
            f"e.g. {k!r}: config gives {expected[k]}, weights have {found[k]})"
        )
    for key in sorted(reference.keys() & state.keys()):
        want, got = reference[key].dtype, state[key].dtype
        if not want.is_floating_point and got != want:
            raise CheckpointError(f"{path}: weight {key!r} is {got}, the model's is {want}")
        if want.is_floating_point and not got.is_floating_point:
            raise CheckpointError(
                f"{path}: weight {key!r} is {got}, not floating point; the file is damaged "
                "or was not written by segpipe.models.save"
            )
        if want.is_floating_point and weights_dtype is not None and got != weights_dtype:
            raise CheckpointError(
                f"{path}: weight {key!r} is {got} but the file's weights_dtype says "
                f"{weights_dtype}; the file was edited or damaged"
            )


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 hex digest of everything that decides the model's output.

    Covers the name, config, class names, input normalisation, and every state-dict tensor
    (sorted keys, shapes, bytes of float32 CPU copies). A model and the same model saved and
    loaded give the same fingerprint; changing any weight changes it. A network that is not
    segpipe's (wrapped, or a plain ``torch.nn.Module``) is identified by its code too
    (:func:`~segpipe.models.base.code_of`); a plain module also by its class.
    """
    h = hashlib.sha256()
    if isinstance(model, SegmentationModel):
        header = {
            "name": model.name,
            "config": dataclasses.asdict(model.config),
            "class_names": list(model.class_names),
            "input_mean": list(model.input_mean),
            "input_std": list(model.input_std),
        }
        # Only when there is one: models without a contract keep their fingerprints.
        if model.pixel_contract is not None:
            header["pixel_contract"] = model.pixel_contract.as_dict()
        # Not segpipe's code (two nn.Sequential may differ): only wrapped models get it hashed.
        if isinstance(model, WrappedModel):
            header["code"] = code_of(model.module)
    else:
        cls = type(model)
        header = {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "class_names": list(getattr(model, "class_names", None) or []),
            "geometry": repr(getattr(model, "geometry", None)),
            "code": code_of(model),
        }
    h.update(json.dumps(header, sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu()
        t = t.to(torch.float32) if t.is_floating_point() else t
        h.update(f"\n{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain Python data (numpy and 0-d torch scalars unwrapped), or TypeError."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    # Subclasses (torch.__version__ is a TorchVersion, numpy scalars subclass float) would be
    # pickled as their class, which weights-only loading then refuses.
    for plain in (bool, int, float, str):
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy scalars, 0-d arrays and tensors
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return _plain(item(), where)
    raise TypeError(
        f"{where} = {value!r} ({type(value).__name__}) cannot go in a checkpoint: use numbers, "
        "strings, booleans, None, lists and str-keyed dicts"
    )
