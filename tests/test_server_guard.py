"""segpipe.flows.server_guard: Prefect's temporary server ends with the process that started
it, however that process ends. The run is a real process, its server a real uvicorn, and the
kill a real SIGKILL."""

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

RUN = textwrap.dedent(
    """
    import sys, time
    {guard}
    from prefect import flow
    from prefect.server.api.server import SubprocessASGIServer

    @flow
    def one():
        return 1

    assert one() == 1
    (server,) = [s for s in SubprocessASGIServer._instances.values() if s.server_process]
    print(server.server_process.pid, flush=True)
    time.sleep(300)
    """
)


def _read_to_end(stream, timeout_s: float) -> bool:
    """Whether ``stream`` reaches its end (every writer gone) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], deadline - time.monotonic())
        if ready and not os.read(stream.fileno(), 65536):
            return True
    return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()  # a zombie has ended
    except FileNotFoundError:
        return False


GUARDS = {
    # the CLI's: no server named, so it guards the temporary one
    "cli": "from segpipe.flows.limits import require_server; require_server()",
    # a flow called from Python: importing a flow module guards it
    "python": "import segpipe.flows.segment_slide",
}


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One home for this module's temporary servers, which run one after another: its
    database is migrated by the first, not by each (about 10 s here)."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.mark.integration
@pytest.mark.parametrize("started", list(GUARDS))
def test_a_killed_run_leaves_no_server_holding_its_output(prefect_home, started):
    """SIGKILLed (the OOM killer), the run left Prefect's uvicorn running, 200 MB, with the
    command's stdout open: a `| tee` or a cron wrapper reading it waited for ever. So did a
    flow called from Python, which only the CLI guarded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # As the flow tests' harness: a loaded CI machine starts the server in over Prefect's 20 s
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    command = [sys.executable, "-c", RUN.format(guard=GUARDS[started])]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = run.stdout.readline()
        assert line.strip().isdigit(), run.stderr.read().decode()[-3000:]
        server = int(line)
        assert _running(server)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(30)
        assert _read_to_end(run.stdout, 30), "the server holds the run's stdout"
        deadline = time.monotonic() + 30
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(server)
    finally:
        run.kill()
        if "server" in locals() and _running(server):
            os.kill(server, signal.SIGKILL)


def test_the_guard_is_idempotent_and_leaves_another_prefect_as_it_is(monkeypatch):
    import subprocess as real

    from prefect.server.api import server

    from segpipe.flows.server_guard import guard_temporary_server

    monkeypatch.setattr(server, "subprocess", real)
    guard_temporary_server()
    guarded = server.subprocess
    assert guarded is not real and guarded.TimeoutExpired is real.TimeoutExpired
    guard_temporary_server()
    assert server.subprocess is guarded, "not wrapped twice"
    monkeypatch.delattr(server, "subprocess")  # a release that starts its server otherwise
    guard_temporary_server()
    assert not hasattr(server, "subprocess")


def test_the_guard_leaves_prefects_server_module_unimported_until_it_is_used():
    """Importing a flow module imported Prefect's server (3-4 s, 85 MB) in every process,
    one that never starts it too; now the module is patched as it is imported."""
    code = textwrap.dedent(
        """
        import sys
        from segpipe.flows.server_guard import _GuardedSubprocess, guard_temporary_server
        guard_temporary_server()
        guard_temporary_server()
        assert "prefect.server.api.server" not in sys.modules
        from prefect.server.api import server
        assert isinstance(server.subprocess, _GuardedSubprocess)
        guard_temporary_server()  # once imported: patched at once, and only once
        assert isinstance(server.subprocess, _GuardedSubprocess)
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "ok", run.stderr[-3000:]
