"""The CPU's cores handed out to forward passes and I/O sections (the stage's use of the gate
is tested in test_pipeline)."""

import contextlib
import threading
import time

import pytest

from segpipe.execution.gate import CoreGate


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def held(section: contextlib.AbstractContextManager) -> tuple[threading.Thread, threading.Event]:
    """A thread inside ``section`` (a gate's ``model(...)`` or ``io()``), once this returns,
    until the event is set."""
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with section:
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(10)
    return thread, release


def entering(section: contextlib.AbstractContextManager, order: list[str], name: str):
    """A started thread that enters ``section`` and appends ``name`` to ``order`` inside."""

    def enter() -> None:
        with section:
            order.append(name)

    thread = threading.Thread(target=enter)
    thread.start()
    return thread


def test_the_gate_counts_cores():
    """Two cores: a one-core pass leaves a core to one I/O section, not two; a waiting pass
    goes before new sections; a whole-CPU pass waits for every section."""
    gate = CoreGate(2)
    holder, release = held(gate.model(1))
    order: list[str] = []
    with gate.io():  # the free core
        late = entering(gate.io(), order, "second section")
        wait_until(lambda: gate._io_waiting == 1)
        assert order == [], "no core left for a second section"
    late.join(10)
    assert order == ["second section"], "it ran once the first section left"
    order.clear()
    with gate.io():
        wide = entering(gate.model(), order, "pass")
        wait_until(lambda: gate._wide_waiting == 1)
        release.set()  # the narrow pass leaves: a core is free, but a pass is waiting
        holder.join(10)
        newcomer = entering(gate.io(), order, "section")
        wait_until(lambda: gate._io_waiting == 1)
        assert order == [], "the whole-CPU pass waits for the section, the newcomer behind it"
    wide.join(10)
    newcomer.join(10)
    assert order == ["pass", "section"]
    with pytest.raises(ValueError, match="cores"):
        CoreGate(0)


@pytest.mark.parametrize("round_", range(20))  # without the rule, a race each loses ~half
def test_waiting_sections_go_before_a_waiting_narrow_pass(round_):
    """Two cores held by a one-core pass and a section; a second one-core pass, then a second
    section wait. The core the section frees goes to the waiting section (the I/O threads'
    work does not wait for the model's queue to run dry), then the pass's."""
    gate = CoreGate(2)
    order: list[str] = []
    first_pass, release_pass = held(gate.model(1))
    first_section, release_section = held(gate.io())
    waiting_pass = entering(gate.model(1), order, "pass")
    wait_until(lambda: gate._model_waiting == 1)
    waiting_section = entering(gate.io(), order, "section")
    wait_until(lambda: gate._io_waiting == 1)
    assert order == [], "both cores are held"
    release_section.set()
    first_section.join(10)
    waiting_section.join(10)
    release_pass.set()
    for t in [first_pass, waiting_pass]:
        t.join(10)
    assert order == ["section", "pass"]


def test_a_waiting_wide_pass_goes_before_a_narrow_one():
    """A one-core pass holds a core; a whole-CPU pass waits; a second one-core pass, though a
    core is free, waits behind it (two lanes could otherwise keep it out for good)."""
    gate = CoreGate(2)
    order: list[str] = []
    first, release_first = held(gate.model(1))
    wide = entering(gate.model(), order, "wide")
    wait_until(lambda: gate._wide_waiting == 1)
    narrow = entering(gate.model(1), order, "narrow")
    wait_until(lambda: gate._model_waiting == 2)
    assert order == [], "a core is free, but the narrow pass waits behind the wide one"
    release_first.set()
    for t in (first, wide, narrow):
        t.join(10)
    assert order == ["wide", "narrow"]


@pytest.mark.parametrize("side", ["io", "narrow", "wide"])
def test_a_wait_cut_short_leaves_no_waiter_behind(side):
    """A KeyboardInterrupt or SystemExit raised in a thread waiting at the gate left it
    counted as waiting: a section's count kept every later narrow pass waiting, a pass's
    limited sections to one a core, with no pass running or waiting."""
    gate = CoreGate(2)
    every_core, release = held(gate.model())
    sections = {"io": gate.io, "narrow": lambda: gate.model(1), "wide": gate.model}

    def interrupted(timeout=None):
        raise KeyboardInterrupt

    gate._cond.wait = interrupted  # the Condition's own, as a signal would cut it short
    with pytest.raises(KeyboardInterrupt), sections[side]():
        pass
    del gate._cond.wait
    release.set()
    every_core.join(10)
    ran = threading.Event()

    def narrow() -> None:  # would wait for a section or a wide pass never to come
        with gate.model(1):
            ran.set()

    threading.Thread(target=narrow, daemon=True).start()
    assert ran.wait(10)
    together = threading.Barrier(4, timeout=10)  # one a core, and one more: none waits

    def section() -> None:
        with gate.io():
            together.wait()

    threads = [threading.Thread(target=section, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    together.wait()
    for t in threads:
        t.join(10)
