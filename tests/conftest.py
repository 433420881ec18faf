import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Shared, noisy CI machines: no per-example deadline; the example count keeps the run short.
settings.register_profile("segpipe", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "segpipe"))

CLASSES = ("background", "tissue", "nucleus")

# glibc's default, set: segpipe.keep_freed_memory() then leaves this process and the ones its
# tests start as they are, so no test's memory depends on which test tuned malloc first.
# tests/test_allocator.py checks the tuning in clean interpreters.
os.environ.setdefault("MALLOC_MMAP_MAX_", "65536")


@pytest.fixture(autouse=True)
def _prefect_console_on_live_stream(request):
    """Prefect's console handler keeps the stream it was configured with, and Prefect
    reconfigures logging when a server starts; a test's capture stream (capsys, capfd) is
    closed after the test, and every later flow then logs into a closed file. Point the
    handlers at the stream that is live now, before each test."""
    # Start the test's own capture first, so "live now" is the stream the test reads.
    for capture in ("capfd", "capsys"):
        if capture in request.fixturenames:
            request.getfixturevalue(capture)
    if "prefect" in sys.modules:
        from prefect.logging.handlers import PrefectConsoleHandler

        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, PrefectConsoleHandler):
                    # Not setStream(): it flushes the old stream, which may be closed.
                    handler.stream = sys.stderr
                    handler.console.file = sys.stderr


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (SQLite, 127.0.0.1) for every flow test of the session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The API URL of the session's Prefect server, for processes a test starts: a command
    given it talks to that server rather than start a temporary one of its own (12-25 s on
    a 2-core machine, its database migrated anew)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def answering_prefect_url():
    """An API URL on 127.0.0.1 whose every GET answers 200, as a Prefect server's ``/health``
    does: for commands that check the server is up, then never run a flow on it."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
        server.shutdown()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A small valid-padding U-Net with random weights, saved as a checkpoint."""
    from segpipe import models

    torch.manual_seed(0)
    net = models.build("unet", class_names=CLASSES, width=4, depth=2)
    return models.save(net, tmp_path_factory.mktemp("ckpt") / "random-unet.pt")


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory):
    """A 300 x 300 synthetic slide as a pyramidal OME-TIFF, with its truth as a Zarr array."""
    from segpipe.synthetic.demo import make_demo_slide

    return make_demo_slide(tmp_path_factory.mktemp("slide"), size=300, seed=1)


# Another process holding the lock of argv[1] (shared when argv[2] is "shared") until its
# stdin closes or it is killed.
HOLDER = """
import sys
from segpipe.io.locks import store_lock
with store_lock(sys.argv[1], shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held_elsewhere():
    """``hold(path, shared=False)`` starts a process holding the store lock of ``path``
    (segpipe.io.locks; a result's run lock exclusively) and returns it once it holds it."""
    procs = []

    def hold(path, *, shared=False):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), "shared" if shared else "excl"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def blocks_run_by(scheduler: str) -> int:
    """How many of segpipe's block tasks (keys ``segpipe-block-*``) the Dask scheduler at
    ``scheduler`` has run: evidence a run went there, not to a cluster of its own or into
    its own process (which would give the same result)."""
    import distributed

    def seen(dask_scheduler):
        keys = {str(entry[0]) for entry in dask_scheduler.transition_log}
        return sum(k.startswith("segpipe-block-") for k in keys)

    with distributed.Client(scheduler, timeout="30s", set_as_default=False) as client:
        return int(client.run_on_scheduler(seen))
