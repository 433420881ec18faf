"""segpipe's networks: build one by name, load a trained one, save and fingerprint it.

>>> from segpipe import models
>>> net = models.build("unet", class_names=["background", "tissue"], width=8, depth=2)
>>> net.num_classes, net.geometry.halo
(2, 20)
>>> "unet" in models.available()
True

Architectures live one per file in this package and register themselves with
``@segpipe.models.base.register``; every module here is imported below, so a new architecture
is one new file. Trained models ship as ``segpipe/models/weights/<name>.pt`` checkpoints.

Networks from elsewhere (MONAI, segmentation_models.pytorch, timm-based) become segpipe models
with :func:`wrap` (geometry measured by a gradient probe when not given); TorchScript and
``torch.export`` files load by path when a JSON/YAML sidecar describes them
(:mod:`segpipe.models.foreign`). What a model was trained on travels as its
:class:`PixelContract` (:mod:`segpipe.models.contract`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segpipe.models.base import (
    REGISTRY,
    SegmentationModel,
    class_names_of,
    geometry_of,
    pixel_contract_of,
    uses_tile_statistics,
)
from segpipe.models.checkpoint import CheckpointError, fingerprint, save
from segpipe.models.checkpoint import load as load_checkpoint
from segpipe.models.contract import (
    OutOfDistributionWarning,
    PixelContract,
    PixelContractError,
    measure_contract,
)
from segpipe.models.foreign import is_foreign, load_foreign, write_sidecar
from segpipe.models.probe import measure_geometry
from segpipe.models.source_checks import channels_taken, check_source, choose_level
from segpipe.models.wrapped import WrappedModel, wrap

__all__ = [
    "CheckpointError",
    "OutOfDistributionWarning",
    "PixelContract",
    "PixelContractError",
    "SegmentationModel",
    "WrappedModel",
    "available",
    "build",
    "channels_taken",
    "check_source",
    "choose_level",
    "class_names_of",
    "fingerprint",
    "geometry_of",
    "label_of",
    "load",
    "measure_contract",
    "measure_geometry",
    "pixel_contract_of",
    "save",
    "shipped",
    "uses_tile_statistics",
    "wrap",
    "write_sidecar",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"

# Import every architecture module so its @register runs.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def available() -> list[str]:
    """Names of the architectures :func:`build` knows, sorted."""
    return sorted(REGISTRY)


def shipped() -> dict[str, Path]:
    """Trained models that come with segpipe: name -> checkpoint file."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.pt"))}


def build(
    name: str,
    *,
    class_names: Sequence[str] | None = None,
    input_mean: Sequence[float] | float | None = None,
    input_std: Sequence[float] | float | None = None,
    **config: Any,
) -> SegmentationModel:
    """A freshly initialised network of architecture ``name``.

    Parameters
    ----------
    name
        One of :func:`available` (``"unet"``).
    class_names
        One name per class; sets ``num_classes`` when that is not given. Default
        ``class_0 .. class_{C-1}``.
    input_mean, input_std
        Per-channel statistics of the ``[0, 1]`` input (or one number for all channels);
        default 0.5 and 0.25.
    **config
        Fields of the architecture's config dataclass, e.g. ``width=32, depth=4,
        padding="same"`` for ``UNetConfig``.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available()}")
    cls = REGISTRY[name]
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        config.setdefault("num_classes", len(class_names))
        if config["num_classes"] != len(class_names):
            raise ValueError(
                f"num_classes={config['num_classes']} but {len(class_names)} class names "
                f"{class_names}; give one or make them agree"
            )
    try:
        cfg = cls.config_class(**config)
    except TypeError as err:
        fields = [f.name for f in dataclasses.fields(cls.config_class)]
        raise ValueError(  # the user's options: a one-line error in the CLI, not a bug's
            f"build({name!r}): bad config {config}; {cls.config_class.__name__} takes {fields}"
        ) from err
    # Counted on the meta device (nothing allocated): --depth 12 allocated 4.5 GB of one
    # layer's weights and died in the allocator (or the OOM killer) instead of saying so.
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(cfg, class_names=class_names).parameters())
    except (RuntimeError, NotImplementedError):  # an __init__ that needs real values (.item())
        size = 0  # counted by the allocator, as before
    if size > MAX_PARAMETERS:
        raise ValueError(
            f"build({name!r}): {cfg} has {size:,} parameters ({size * 4 / 2**30:,.0f} GiB of "
            f"float32 weights), more than segpipe builds ({MAX_PARAMETERS:,}): give a smaller "
            "width or depth"
        )
    return cls(cfg, class_names=class_names, input_mean=input_mean, input_std=input_std)


# Segmentation networks hold millions of weights (the U-Net paper's: 31 million); a billion
# is a mistyped width or depth.
MAX_PARAMETERS = 2**30


def load(name_or_path: str | os.PathLike[str]) -> SegmentationModel:
    """A trained model, in eval mode: a shipped one by name, a checkpoint file by path, or a
    TorchScript / ``torch.export`` file with a sidecar (:func:`write_sidecar`) by path."""
    models = shipped()
    if isinstance(name_or_path, str) and name_or_path in models:
        return load_checkpoint(models[name_or_path])
    path = Path(name_or_path)
    if is_foreign(path):
        return load_foreign(path)
    if path.is_file():
        return load_checkpoint(path)
    hint = (
        f" {name_or_path!r} is an architecture, not a trained model: "
        f"segpipe.models.build({name_or_path!r}, ...) makes an untrained one."
        if name_or_path in REGISTRY
        else ""
    )
    raise ValueError(
        f"no shipped model or checkpoint file {str(name_or_path)!r}. Shipped models: "
        f"{sorted(models) or 'none yet'}; architectures for build(): {available()}.{hint}"
    )


def label_of(name_or_path: str | os.PathLike[str]) -> str:
    """What a result records of the model :func:`load` takes: a shipped model's name as it
    is, a checkpoint's path made absolute (relative, it named a file only from a working
    folder nobody recorded)."""
    if isinstance(name_or_path, str) and name_or_path in shipped():
        return name_or_path
    return os.path.abspath(name_or_path)
