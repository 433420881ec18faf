"""SegmentConfig: validation, construction, the result/execution split, and one config reaching
every entry point (CLI, flows, archive, Python API) for every field, none listed by hand."""

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal

import numpy as np
import pytest

import segpipe
from segpipe.config import EXECUTION, RESULT, SegmentConfig, setting_help, settings

HINTS = typing.get_type_hints(SegmentConfig)
DEFAULTS = SegmentConfig()

# Where a value derived from the field's type cannot be valid: a device is one of a few names,
# and a scheduler is connected to (its workers are asked about autocast) before anything is
# recorded, so it must be one that exists; a foreground that is no mode is a mask file, too.
OVERRIDES: dict[str, Any] = {"device": "cpu", "scheduler": "sync", "foreground": "none"}


def _value_type(name: str) -> Any:
    """The field's annotation without ``| None``."""
    hint = HINTS[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def non_default_values(f: dataclasses.Field[Any]) -> list[Any]:
    """Valid values of field ``f`` other than its default, derived from its type."""
    if f.name in OVERRIDES:
        return [OVERRIDES[f.name]]
    default, kind = getattr(DEFAULTS, f.name), _value_type(f.name)
    if typing.get_origin(kind) is Literal:
        return [next(c for c in typing.get_args(kind) if c != default)]
    if kind is bool:
        return [v for v in (True, False) if v != default]
    if kind is int:
        return [default * 2 if default else 1]
    if kind is float:
        return [default / 2 if default else 0.5]
    if kind is str:
        return [f"{f.name}-value"]
    raise TypeError(f"no generic value for SegmentConfig.{f.name}: {HINTS[f.name]}")


CASES = [
    pytest.param(f.name, value, id=f"{f.name}={value}")
    for f in dataclasses.fields(SegmentConfig)
    for value in non_default_values(f)
]


def test_the_generic_values_are_valid_and_not_defaults():
    assert {c.values[0] for c in CASES} == {f.name for f in dataclasses.fields(SegmentConfig)}
    for param in CASES:
        name, value = param.values
        assert getattr(SegmentConfig(**{name: value}), name) == value != getattr(DEFAULTS, name)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tile", 0),
        ("tile", 2.5),
        ("tile", "512"),
        ("task_tiles", 0),
        ("min_level_size", -1),
        ("batch_size", True),
        ("level", -1),
        ("window", 0),
        ("n_workers", 0),
        ("threads", 0),
        ("threads", 2.5),
        ("threads", "2"),
        ("mode", "fast"),
        ("probability_dtype", "int8"),
        ("overlap", 1.0),
        ("overlap", -0.1),
        ("sigma_scale", 0),
        ("sigma_scale", math.inf),  # stored in zarr.json as Infinity, which is not JSON
        ("sigma_scale", math.nan),
        ("overlap", math.nan),
        ("pixel_size_um", -0.5),
        ("pixel_size_um", math.inf),
        ("pixel_size_um", True),  # 1 µm, silently, from a flow's JSON parameters
        ("pixel_size_um", 0),
        ("pixel_size_um", -0.0),
        ("sigma_scale", True),
        ("overlap", False),
        ("amp", "yes"),
        ("device", "gpu"),
        *[("device", d) for d in ("cpu0", "cudax", "cuda:", "cuda:1 ", "cuda:1x", "mps2", "CPU")],
        *[("foreground", v) for v in ("", "   ", "\t\n", None, 3)],
        ("scheduler", 8786),
        ("scheduler", "foo"),
        ("scheduler", ""),
        ("scheduler", "tcp://"),
        *[("scheduler", a) for a in ("syncx", "sync now", "h:8786 x", "h:8786/x", "tcp://h:1 x")],
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_the_value(name, value):
    with pytest.raises(ValueError, match=r"SegmentConfig\.(\w+) .*got (.+)") as info:
        SegmentConfig(**{name: value})
    message = str(info.value)
    assert message.startswith(f"SegmentConfig.{name} ")
    assert repr(value) in message or str(value) in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("tile", np.int64(256), 256),
        ("batch_size", np.uint16(3), 3),
        ("overlap", np.float32(0.25), 0.25),
        ("pixel_size_um", np.float32(0.3), float(np.float32(0.3))),
        ("sigma_scale", np.float64(0.5), 0.5),
        ("level", np.int32(0), 0),
    ],
)
def test_numpy_numbers_are_taken_as_the_python_number_they_equal(name, value, expected):
    config = SegmentConfig(**{name: value})
    stored = getattr(config, name)
    assert stored == expected and type(stored) is type(expected)
    json.dumps(config.as_dict())  # the stored config is JSON


@pytest.mark.parametrize(("name", "value"), [("tile", np.float64(256.0)), ("amp", np.bool_(1))])
def test_numpy_numbers_of_the_wrong_kind_are_still_refused(name, value):
    with pytest.raises(ValueError, match=rf"SegmentConfig\.{name} "):
        SegmentConfig(**{name: value})


@pytest.mark.parametrize(
    "address", ["sync", "tcp://127.0.0.1:8786", "127.0.0.1:8786", "[::1]:8786", "inproc://h/1/2"]
)
def test_a_scheduler_address_dask_takes_is_accepted(address):
    assert SegmentConfig(scheduler=address).scheduler == address


@pytest.mark.parametrize("device", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_every_device_the_help_names_is_accepted(device):
    assert SegmentConfig(device=device).device == device


def test_blend_overlap_0_is_the_closed_end_of_its_range():
    """Windows that only abut are a valid blend run: [0, 1), as the message says."""
    assert SegmentConfig(mode="blend", overlap=0.0).overlap == 0.0


def test_a_mask_files_path_object_is_taken_as_its_string(tmp_path):
    """The stored config is JSON: a pathlib.Path for a mask file is kept as its string."""
    config = SegmentConfig(foreground=tmp_path / "mask.png")
    assert config.foreground == str(tmp_path / "mask.png")
    json.dumps(config.as_dict())


def test_a_config_cannot_be_changed_past_its_validation():
    """Validated once, in __post_init__: setting a field afterwards would skip every check
    (replace() is the way to a changed config). Equal configs hash equal."""
    config = SegmentConfig(tile=256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tile = 0  # type: ignore[misc]
    assert config.tile == 256
    assert hash(config) == hash(SegmentConfig(tile=256))


@pytest.mark.parametrize(
    ("changes", "ignored"),
    [
        ({"window": 64}, ("window",)),
        ({"overlap": 0.5, "sigma_scale": 0.25}, ("overlap", "sigma_scale")),
        ({"window": 64, "mode": "blend"}, ()),
        ({}, ()),
    ],
)
def test_blend_settings_are_ignored_in_exact_mode_and_a_run_refuses_them(
    changes, ignored, tmp_path
):
    """Recorded in the result, they changed no pixel: a run refuses them, naming them."""
    config = SegmentConfig(**changes)
    assert config.ignored_settings() == ignored
    if ignored:
        with pytest.raises(ValueError, match=rf"^{', '.join(ignored)} set, but mode='exact'"):
            segpipe.segment(tmp_path / "slide.tif", tmp_path / "r.zarr", "tissue-unet", config)
        assert not (tmp_path / "r.zarr").exists()


def test_blend_settings_equal_to_their_defaults_are_not_ignored_settings():
    """A deployment's JSON spells the defaults out: equal values, other float objects."""
    config = SegmentConfig.from_dict(json.loads(json.dumps(DEFAULTS.as_dict())))
    assert config == DEFAULTS
    assert config.ignored_settings() == ()
    assert SegmentConfig(overlap=float("0.25"), sigma_scale=float("0.125")).ignored_settings() == ()


def test_replace_validates_too():
    with pytest.raises(ValueError, match=r"SegmentConfig\.overlap must be in \[0, 1\), got 1\.5"):
        SegmentConfig().replace(overlap=1.5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: SegmentConfig().replace(tiles=256),
        lambda: SegmentConfig.from_dict({"tile": 256, "tiles": 256}),
    ],
    ids=["replace", "from_dict"],
)
def test_unknown_names_are_refused_and_the_known_ones_listed(build):
    with pytest.raises(ValueError, match=r"unknown segment setting\(s\) 'tiles'.*batch_size"):
        build()


def test_from_dict_and_as_dict_round_trip_through_json():
    config = SegmentConfig(tile=256, mode="blend", window=64, amp=False, n_workers=2)
    assert SegmentConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config
    assert config.replace(batch_size=8) == SegmentConfig(**{**config.as_dict(), "batch_size": 8})
    assert config.replace() == config


def test_every_setting_is_a_result_or_an_execution_setting_with_help():
    result, execution = DEFAULTS.result_settings(), DEFAULTS.execution_settings()
    assert set(result).isdisjoint(execution)
    assert set(result) | set(execution) == {f.name for f in dataclasses.fields(SegmentConfig)}
    assert [f.name for f in settings(RESULT)] == list(result)
    assert [f.name for f in settings(EXECUTION)] == list(execution)
    # The module doc's promise: only these never change the numbers.
    assert set(execution) == {"batch_size", "device", "n_workers", "scheduler", "threads"}
    for f in settings():
        assert setting_help(f.name) == f.metadata["help"] and f.metadata["help"].strip()


@pytest.mark.parametrize(("name", "value"), CASES)
def test_the_archive_segments_again_for_a_result_setting_only(name, value, tmp_path):
    """A sidecar written with the defaults: a new result setting makes the image due, a new
    execution setting does not."""
    from segpipe.archive import Fingerprint, decide, image_paths
    from segpipe.archive.state import state_params

    paths = image_paths(tmp_path, "a.tif")
    fp = Fingerprint(10, 1.0, "abc")
    state = {"fingerprint": fp.as_dict(), "model_sha256": "m", "params": state_params(DEFAULTS)}
    paths.state.write_text(json.dumps(state | {"status": "failed"}))
    reason = decide(paths, fp, "m", SegmentConfig(**{name: value})).reason
    if name in DEFAULTS.result_settings():
        assert reason == "parameters changed"
    else:
        assert reason == "previous run failed"


# -- one SegmentConfig reaches every entry point -------------------------------------------


class Captured(ValueError):
    """Raised by the stand-in for segpipe.segment once it has seen its config (a ValueError:
    the archive flow does not retry it)."""


@pytest.fixture
def captured(monkeypatch):
    """Replace segpipe.segment (where the CLI and the flows call it) by a stand-in that records
    the SegmentConfig it was given, then stops the run."""
    calls: list[dict[str, Any]] = []

    def fake_segment(source, output, model="tissue-unet", config=None, **kwargs):
        calls.append({"config": config, "settings": kwargs, "model": model})
        raise Captured(f"segment called with {config!r}")

    monkeypatch.setattr(segpipe, "segment", fake_segment)
    monkeypatch.setattr("segpipe.execution.segment.segment", fake_segment)
    return calls


def _received_by_archive(calls: list[dict[str, Any]], expected: SegmentConfig) -> SegmentConfig:
    """The config an archive run handed to segment: the expected one, except that a run
    given no scheduler starts one local cluster for all its images and names its address
    (an execution setting: never part of a result's identity)."""
    config = _received(calls)
    if expected.scheduler is None:
        assert str(config.scheduler).startswith(("inproc://", "tcp://"))
        config = config.replace(scheduler=None)
    return config


def _received(calls: list[dict[str, Any]]) -> SegmentConfig:
    (call,) = calls
    known = {f.name for f in dataclasses.fields(SegmentConfig)}
    assert not known & set(call["settings"]), "settings travel in the config, not loose"
    assert isinstance(call["config"], SegmentConfig)
    return call["config"]


def _cli_args(name: str, value: Any) -> list[str]:
    f = {f.name: f for f in dataclasses.fields(SegmentConfig)}[name]
    flag = f.metadata["flag"] or "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag.removeprefix("--")]
    return [flag, str(value)]


@pytest.mark.parametrize(("name", "value"), CASES)
def test_cli_segment_passes_every_setting(name, value, captured, small_slide, tmp_path):
    from segpipe.cli import main

    args = ["segment", str(small_slide.image), str(tmp_path / "r.zarr"), *_cli_args(name, value)]
    assert main(args) == 2  # the stand-in's error, reported as a user error
    assert _received(captured) == SegmentConfig(**{name: value})


def test_cli_segment_defaults_are_the_config_defaults(captured, small_slide, tmp_path):
    from segpipe.cli import main

    main(["segment", str(small_slide.image), str(tmp_path / "r.zarr")])
    assert _received(captured) == DEFAULTS


@pytest.mark.parametrize(("name", "value"), CASES)
def test_cli_serve_passes_every_setting(name, value, tmp_path, monkeypatch, answering_prefect_url):
    import segpipe.flows.archive
    from segpipe.cli import main

    served = []
    monkeypatch.setenv("PREFECT_API_URL", answering_prefect_url)  # checked, never used
    monkeypatch.setattr(segpipe.flows.archive, "serve_archive", lambda *a, **kw: served.append(kw))
    assert main(["serve", str(tmp_path), str(tmp_path / "out"), *_cli_args(name, value)]) == 0
    assert served[0]["config"] == SegmentConfig(**{name: value})


@pytest.fixture
def one_image_archive(tmp_path):
    """An archive of one file; the stand-in segment never reads it."""
    source = tmp_path / "archive"
    source.mkdir()
    (source / "a.tif").write_bytes(b"an image")
    return source


@pytest.mark.integration
@pytest.mark.parametrize(("name", "value"), CASES)
def test_cli_archive_passes_every_setting(
    name, value, captured, prefect_harness, one_image_archive, random_checkpoint, tmp_path
):
    from segpipe.cli import main

    args = [
        "archive",
        str(one_image_archive),
        str(tmp_path / "out"),
        "--model",
        str(random_checkpoint),
        "--retries",
        "0",
        *_cli_args(name, value),
    ]
    assert main(args) == 1  # the image failed with the stand-in's error
    expected = SegmentConfig(**{name: value})
    assert _received_by_archive(captured, expected) == expected


@pytest.mark.integration
@pytest.mark.parametrize(("name", "value"), CASES)
def test_segment_slide_flow_passes_every_setting(
    name, value, captured, prefect_harness, small_slide, random_checkpoint, tmp_path, monkeypatch
):
    from segpipe.flows import segment_slide as module

    ingested: list[float | None] = []

    def fake_ingest(source, store, *, pixel_size_um=None, progress=False):
        ingested.append(pixel_size_um)
        return source

    monkeypatch.setattr(module, "ingested_image", fake_ingest)
    # The source stands for its copy here: its level is the copy's (tests/test_flows.py).
    monkeypatch.setattr(module, "ingested_level", lambda source, image, level: level)
    # As a deployment gives it: JSON, parsed and validated by Prefect into a SegmentConfig.
    with pytest.raises(Captured):
        module.segment_slide(
            str(small_slide.image),
            str(tmp_path / "r.zarr"),
            str(random_checkpoint),
            config={name: value},
        )
    assert _received(captured) == SegmentConfig(**{name: value})
    assert ingested == [SegmentConfig(**{name: value}).pixel_size_um]


@pytest.mark.integration
@pytest.mark.parametrize(("name", "value"), CASES)
def test_process_archive_flow_passes_every_setting(
    name, value, captured, prefect_harness, one_image_archive, random_checkpoint, tmp_path
):
    from segpipe.flows.archive import process_archive

    result = process_archive(
        str(one_image_archive),
        str(tmp_path / "out"),
        str(random_checkpoint),
        config=SegmentConfig(**{name: value}),
        retries=0,
    )
    assert list(result["failed"]) == ["a.tif"]
    assert "Captured" in result["failed"]["a.tif"]
    expected = SegmentConfig(**{name: value})
    assert _received_by_archive(captured, expected) == expected
    assert captured[0]["settings"]["model_name"] == str(random_checkpoint)


@pytest.fixture(scope="module")
def pyramid(small_slide, tmp_path_factory):
    """The small slide as an OME-Zarr with three levels (so ``level`` 1 exists)."""
    return segpipe.ingest(
        small_slide.image, tmp_path_factory.mktemp("pyramid") / "slide.zarr", min_level_size=64
    )


# What segment() decides for itself before it records a result: blend mode's window,
# whether autocast is on, the level (closest to the model's pixel size when not given), and
# what foreground "auto" means for the image.
RESOLVED = ("window", "amp", "level", "foreground")
BLEND_ONLY = ("window", "overlap", "sigma_scale")


@pytest.mark.parametrize("form", ["keywords", "config"])
@pytest.mark.parametrize(("name", "value"), CASES)
def test_python_api_passes_every_setting(
    name, value, form, pyramid, random_checkpoint, tmp_path, monkeypatch
):
    """segment(src, out, model, name=value) and segment(src, out, model, SegmentConfig(...))
    both record the setting in the result's metadata (its prepare step is stopped)."""
    import segpipe.execution.segment as module

    seen = []

    def stop(output, meta, **kwargs):
        seen.append(meta.config)
        raise Captured("prepared")

    monkeypatch.setattr(module, "prepare_result", stop)
    # blend's settings with blend mode: exact mode refuses them (SegmentConfig.ignored_settings)
    settings = {name: value, **({"mode": "blend"} if name in BLEND_ONLY else {})}
    expected = SegmentConfig(**settings)
    given = settings if form == "keywords" else {"config": expected}
    with pytest.raises(Captured):
        segpipe.segment(pyramid, tmp_path / "r.zarr", random_checkpoint, **given)
    (config,) = seen
    if name == "window":  # recorded as blend mode takes it: snapped to the model
        from segpipe import models
        from segpipe.geometry.blending import blend_window_side

        geometry = models.geometry_of(models.load(random_checkpoint))
        expected = expected.replace(window=blend_window_side(geometry, value))
    assert getattr(config, name) == getattr(expected, name)
    resolved = {k: getattr(expected, k) for k in RESOLVED if k != name}
    assert config.replace(**resolved) == expected


def test_python_api_keywords_override_the_config(pyramid, random_checkpoint, tmp_path, monkeypatch):
    import segpipe.execution.segment as module

    seen = []
    monkeypatch.setattr(
        module, "prepare_result", lambda out, meta, **kw: seen.append(meta.config) or 1 / 0
    )
    with pytest.raises(ZeroDivisionError):
        segpipe.segment(
            pyramid, tmp_path / "r.zarr", random_checkpoint, SegmentConfig(tile=128), tile=64
        )
    assert seen[0].tile == 64
    with pytest.raises(ValueError, match=r"unknown segment setting.*'tiles'"):
        segpipe.segment(pyramid, tmp_path / "r.zarr", random_checkpoint, tiles=64)


# -- Prefect parses a deployment's JSON into a SegmentConfig --------------------------------


@pytest.mark.parametrize("flow_name", ["segment_slide", "process_archive"])
def test_prefect_validates_a_config_parameter(flow_name):
    from segpipe.flows.archive import process_archive
    from segpipe.flows.segment_slide import segment_slide

    flow = {"segment_slide": segment_slide, "process_archive": process_archive}[flow_name]
    base = {"source": "/in", ("output" if flow is segment_slide else "output_root"): "/out"}

    parsed = flow.validate_parameters(base | {"config": {"tile": 256, "mode": "blend"}})
    assert parsed["config"] == SegmentConfig(tile=256, mode="blend")
    assert flow.validate_parameters(base)["config"] is None
    schema = flow.parameters.model_dump()
    assert "SegmentConfig" in json.dumps(schema["definitions"])
    # Sent to the API as JSON and back.
    sent = json.loads(json.dumps(flow.serialize_parameters(parsed)))
    assert flow.validate_parameters(sent)["config"] == parsed["config"]

    from prefect.exceptions import ParameterTypeError

    for bad, what in (({"tiles": 256}, "tiles"), ({"tile": 0}, "SegmentConfig.tile")):
        with pytest.raises(ParameterTypeError, match=what):
            flow.validate_parameters(base | {"config": bad})


@pytest.mark.parametrize("flow_name", ["segment_slide", "process_archive"])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("pixel_size_um", True),
        ("batch_size", True),
        ("tile", "256"),
        ("tile", 256.0),
        ("amp", "yes"),
        ("threads", "2"),
        ("overlap", False),
    ],
)
def test_prefect_refuses_a_config_value_that_segment_config_refuses(flow_name, name, value):
    """Pydantic's lax parsing of each field ("256" -> 256, True -> 1.0 µm) came before
    SegmentConfig's checks: a deployment's JSON ran with values every other entry point
    refuses."""
    from prefect.exceptions import ParameterTypeError

    from segpipe.flows.archive import process_archive
    from segpipe.flows.segment_slide import segment_slide

    with pytest.raises(ValueError, match=rf"SegmentConfig\.{name} "):
        SegmentConfig(**{name: value})
    flow = {"segment_slide": segment_slide, "process_archive": process_archive}[flow_name]
    base = {"source": "/in", ("output" if flow is segment_slide else "output_root"): "/out"}
    with pytest.raises(ParameterTypeError, match=rf"SegmentConfig\.{name} "):
        flow.validate_parameters(base | {"config": {name: value}})
    with pytest.raises(ParameterTypeError, match="a mapping of settings, got 7"):
        flow.validate_parameters(base | {"config": 7})
