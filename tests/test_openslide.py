"""segpipe.io.readers.OpenSlideReader's handle across threads.

Through a fake ``openslide`` module (put in ``sys.modules``), whose handles serve a random
RGBA image and count themselves, so the tests run without OpenSlide and can hold a thread
inside OpenSlide's calls. The reader's pixels, levels and errors on real slides are tested
in tests/test_readers.py and tests/test_vendor_formats.py.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from segpipe.io.readers import ImageReadError, OpenSlideReader

RGBA = np.random.default_rng(2).integers(1, 256, (300, 400, 4), dtype=np.uint8)


class FakeOpenSlide:
    """What segpipe needs of ``openslide``: ``OpenSlide(path)`` handles of one level of
    ``RGBA``, and ``OpenSlideError``. Handles are numbered as opened (``opened`` counts them,
    held weakly: a handle, as openslide-python's, closes as its last reference goes).
    ``on_open`` and ``on_read`` run inside the handle's constructor and ``read_region`` (to
    hold a thread there); a handle in ``broken`` fails every read, as OpenSlide's keep an
    error."""

    def __init__(self) -> None:
        self.opened: list[weakref.ref[Any]] = []
        self.closed: set[int] = set()
        self.closed_under_read: list[int] = []
        self.broken: set[int] = set()
        self.on_open: Callable[[], None] = lambda: None
        self.on_read: Callable[[], None] = lambda: None
        self.module = types.ModuleType("openslide")
        self.module.OpenSlideError = type("OpenSlideError", (Exception,), {})  # type: ignore[attr-defined]
        self.module.OpenSlide = self._handle_class()  # type: ignore[attr-defined]

    def _handle_class(self) -> type:
        fake = self

        class Handle:
            properties: ClassVar[dict[str, str]] = {
                "openslide.mpp-x": "0.5",
                "openslide.vendor": "fake",
            }
            level_downsamples = (1.0,)
            level_dimensions = ((RGBA.shape[1], RGBA.shape[0]),)

            def __init__(self, path: str) -> None:
                self.index = len(fake.opened)
                fake.opened.append(weakref.ref(self))
                fake.on_open()

            def read_region(
                self, corner: tuple[int, int], level: int, size: tuple[int, int]
            ) -> np.ndarray:
                fake.on_read()
                if self.index in fake.closed:  # OpenSlide would read freed memory
                    fake.closed_under_read.append(self.index)
                if self.index in fake.broken:
                    raise fake.module.OpenSlideError("TIFFReadTile failed")
                (x, y), (w, h) = corner, size
                return RGBA[y : y + h, x : x + w]

            def close(self) -> None:
                fake.closed.add(self.index)

            def __del__(self) -> None:  # as openslide-python's handle does
                self.close()

        return Handle


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeOpenSlide:
    fake = FakeOpenSlide()
    monkeypatch.setitem(sys.modules, "openslide", fake.module)
    return fake


def _opening_together(fake: FakeOpenSlide, threads: int) -> None:
    """Make each handle's constructor wait (1 s at most) until ``threads`` are inside one:
    a reader that opens unlocked opens one handle per thread."""
    barrier = threading.Barrier(threads, timeout=1)

    def wait() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):  # one let in, as it should be
            barrier.wait()

    fake.on_open = wait


def _read_in_threads(reader: OpenSlideReader, boxes: list[tuple[int, int, int, int]]) -> list[Any]:
    """What ``reader.read`` gives for each box, read each in a thread of its own at once
    (its pixels, or the error it raised)."""

    def read(box: tuple[int, int, int, int]) -> Any:
        try:
            return reader.read(*box)
        except ImageReadError as exc:
            return exc

    with ThreadPoolExecutor(len(boxes)) as pool:
        return list(pool.map(read, boxes))


BOXES = [(0, 64, 0, 64), (100, 164, 200, 264), (236, 300, 336, 400)]


def test_threads_reading_an_unpickled_reader_open_one_handle(fake, tmp_path: Path) -> None:
    """As dask's threads do with a reader that came to a worker pickled, handle-less."""
    reader = pickle.loads(pickle.dumps(OpenSlideReader(tmp_path / "slide.mrxs")))
    del fake.opened[:]
    _opening_together(fake, len(BOXES))
    for pixels, (y0, y1, x0, x1) in zip(_read_in_threads(reader, BOXES), BOXES, strict=True):
        np.testing.assert_array_equal(pixels, RGBA[y0:y1, x0:x1, :3])
    assert len(fake.opened) == 1


def test_threads_reading_after_an_error_open_one_new_handle(fake, tmp_path: Path) -> None:
    """The handle an error dropped is dropped once (the one a second failing read finds is
    already a new one, not dropped again); the reads after it share one new handle."""
    reader = OpenSlideReader(tmp_path / "slide.mrxs")
    fake.broken.add(0)
    all_in = threading.Barrier(len(BOXES), timeout=5)
    fake.on_read = all_in.wait  # every read on the broken handle before any fails
    failures = _read_in_threads(reader, BOXES)
    assert all(isinstance(f, ImageReadError) for f in failures)
    assert "slide.mrxs: OpenSlide cannot read level 0 at y 0:64, x 0:64" in str(failures[0])
    assert len(fake.opened) == 1  # no read opened a handle: the broken one is merely dropped
    fake.on_read = lambda: None
    _opening_together(fake, len(BOXES))
    for pixels, (y0, y1, x0, x1) in zip(_read_in_threads(reader, BOXES), BOXES, strict=True):
        np.testing.assert_array_equal(pixels, RGBA[y0:y1, x0:x1, :3])
    assert len(fake.opened) == 2
    assert reader.valid_mask(0, 64, 0, 64).all()


def test_closing_during_a_read_closes_the_handle_as_the_read_ends(fake, tmp_path: Path) -> None:
    """OpenSlide would free a handle closed under a read of it in another thread."""
    reader = OpenSlideReader(tmp_path / "slide.mrxs")
    inside, closed = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        assert closed.wait(5)

    fake.on_read = hold
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit(reader.read, 10, 20, 30, 40)
        assert inside.wait(5)
        reader.close()
        closed.set()
        np.testing.assert_array_equal(read.result(), RGBA[10:20, 30:40, :3])
    assert fake.closed_under_read == []
    assert fake.closed == {0}  # by the read's end, not left to the garbage collector
    fake.on_read = lambda: None
    np.testing.assert_array_equal(reader.read(0, 5, 0, 5), RGBA[:5, :5, :3])
    assert len(fake.opened) == 2


def test_closing_an_idle_reader_closes_its_handle(fake, tmp_path: Path) -> None:
    reader = OpenSlideReader(tmp_path / "slide.mrxs")
    reader.read(0, 5, 0, 5)
    reader.close()
    assert fake.closed == {0}
    reader.read(0, 5, 0, 5)
    assert len(fake.opened) == 2


def test_a_slide_replaced_since_it_was_opened_is_refused(fake, tmp_path: Path) -> None:
    """A worker's copy re-opens by path: OpenSlide read a slide saved over the one the run
    checked, where the TIFF and PNG readers refused it."""
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"the slide the run checked")
    shipped = pickle.dumps(OpenSlideReader(path))
    path.write_bytes(b"another scan, saved over it")
    with pytest.raises(ImageReadError, match=r"slide\.mrxs changed since it was opened"):
        pickle.loads(shipped).read(0, 4, 0, 4)
    np.testing.assert_array_equal(OpenSlideReader(path).read(0, 4, 0, 4), RGBA[:4, :4, :3])


@pytest.mark.parametrize(
    ("mpp", "expected", "warned"),
    [
        ({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5"}, 0.5, False),
        ({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.7"}, 0.5, True),
        ({"openslide.mpp-y": "0.25"}, 0.25, False),
    ],
)
def test_pixel_size_is_x_and_warned_of_where_y_differs(
    fake: FakeOpenSlide, monkeypatch: pytest.MonkeyPatch, mpp: dict, expected: float, warned: bool
) -> None:
    """Non-square pixels were taken along x silently (other formats' readers warn), and a
    slide declaring only mpp-y had no pixel size."""
    import warnings

    handle = fake.module.OpenSlide  # type: ignore[attr-defined]
    monkeypatch.setattr(handle, "properties", {**mpp, "openslide.vendor": "fake"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = OpenSlideReader(Path("slide.svs"))
    said = [str(w.message) for w in caught]
    assert reader.pixel_size_um == expected
    assert bool(said) == warned
    if warned:
        assert said == ["slide.svs: openslide.mpp differs in X (0.5 µm) and Y (0.7 µm); using X"]
