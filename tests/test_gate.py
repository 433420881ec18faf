"""The CPU's cores handed out to forward passes and I/O sections (the stage's use of the gate
is tested in test_pipeline)."""

import threading
import time

import pytest

from segpipe.execution.gate import CoreGate


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_the_gate_counts_cores():
    """Two cores: a one-core pass leaves a core to one I/O section, not two; a waiting pass
    goes before new sections; a whole-CPU pass waits for every section."""
    gate = CoreGate(2)
    narrow_in, release = threading.Event(), threading.Event()

    def narrow_pass() -> None:
        with gate.model(1):
            narrow_in.set()
            release.wait(10)

    holder = threading.Thread(target=narrow_pass)
    holder.start()
    assert narrow_in.wait(10)
    entered = threading.Event()

    def second_section() -> None:
        with gate.io():
            entered.set()

    with gate.io():  # the free core
        late = threading.Thread(target=second_section)
        late.start()
        wait_until(lambda: gate._io_waiting == 1)
        assert not entered.is_set(), "no core left for a second section"
    assert entered.wait(10), "it ran once the first section left"
    late.join(10)
    wide_in, order = threading.Event(), []

    def wide_pass() -> None:
        with gate.model():
            wide_in.set()
            order.append("pass")

    def new_section() -> None:
        with gate.io():
            order.append("section")

    with gate.io():
        wide = threading.Thread(target=wide_pass)
        wide.start()
        wait_until(lambda: gate._wide_waiting == 1)
        release.set()  # the narrow pass leaves: a core is free, but a pass is waiting
        holder.join(10)
        newcomer = threading.Thread(target=new_section)
        newcomer.start()
        wait_until(lambda: gate._io_waiting == 1)
        assert not wide_in.is_set(), "a whole-CPU pass waits for the section"
        assert order == [], "the new section waits behind the waiting pass"
    wide.join(10)
    newcomer.join(10)
    assert order == ["pass", "section"]
    with pytest.raises(ValueError, match="cores"):
        CoreGate(0)


def test_waiting_sections_go_before_a_waiting_narrow_pass():
    """Two cores held by a one-core pass and a section; a second section and a second
    one-core pass wait. The core the section frees goes to the waiting section (the I/O
    threads' work does not wait for the model's queue to run dry), then the pass's."""
    gate = CoreGate(2)
    order: list[str] = []
    first_in, release_first, section_in, release_section = (threading.Event() for _ in range(4))

    def first_pass() -> None:
        with gate.model(1):
            first_in.set()
            release_first.wait(10)

    def first_section() -> None:
        with gate.io():
            section_in.set()
            release_section.wait(10)

    def waiting_section() -> None:
        with gate.io():
            order.append("section")
            time.sleep(0.05)

    def waiting_pass() -> None:
        with gate.model(1):
            order.append("pass")

    holders = [threading.Thread(target=first_pass), threading.Thread(target=first_section)]
    holders[0].start()
    assert first_in.wait(10)
    holders[1].start()
    assert section_in.wait(10)
    waiters = [threading.Thread(target=waiting_pass), threading.Thread(target=waiting_section)]
    for t in waiters:
        t.start()
    wait_until(lambda: (gate._io_waiting, gate._model_waiting) == (1, 1))
    assert order == [], "both cores are held"
    release_section.set()
    holders[1].join(10)
    waiters[1].join(10)
    release_first.set()
    for t in [holders[0], waiters[0]]:
        t.join(10)
    assert order == ["section", "pass"]


def test_a_waiting_wide_pass_goes_before_a_narrow_one():
    """A one-core pass holds a core; a whole-CPU pass waits; a second one-core pass, though a
    core is free, waits behind it (two lanes could otherwise keep it out for good)."""
    gate = CoreGate(2)
    order: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def first_pass() -> None:
        with gate.model(1):
            first_in.set()
            release_first.wait(10)

    def wide_pass() -> None:
        with gate.model():
            order.append("wide")

    def narrow_pass() -> None:
        with gate.model(1):
            order.append("narrow")

    threads = [threading.Thread(target=first_pass)]
    threads[0].start()
    assert first_in.wait(10)
    threads.append(threading.Thread(target=wide_pass))
    threads[-1].start()
    wait_until(lambda: gate._wide_waiting == 1)
    threads.append(threading.Thread(target=narrow_pass))
    threads[-1].start()
    wait_until(lambda: gate._model_waiting == 2)
    assert order == [], "a core is free, but the narrow pass waits behind the wide one"
    release_first.set()
    for t in threads:
        t.join(10)
    assert order == ["wide", "narrow"]
