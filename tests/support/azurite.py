"""Azurite (the Table Storage emulator, from npm) for the test session, and a TCP cut-off switch.

Register as a pytest plugin (`pytest_plugins = ["tests.support.azurite"]` in the root conftest).
Fixtures:

- `azurite` (session): one in-memory Azurite table service on a free loopback port, started with
  node directly (killing an `npx` parent would leave the server running) and stopped by PID.
- `azurite_table` / `table_state_values`: a fresh, unique table name per test, and the settings
  (`STATE_STORE`, `STATE_CONNECTION`, `STATE_TABLE_NAME`) for the table store on it.
- `azurite_on_disk`: an Azurite of its own persisting to a temporary folder, for restarts.

`AzuriteServer` and `TcpProxy` work outside pytest too (the benchmark uses them), and
`wall_clock_ahead` runs a subprocess whose wall clock reads later, for claim leases that expire.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AZURITE_TABLE = ROOT / "node_modules" / "azurite" / "dist" / "src" / "table" / "main.js"
AZURITE_BIN = ROOT / "node_modules" / ".bin" / "azurite-table"
ACCOUNT = "devstoreaccount1"
# The emulator's published, well-known development key: not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_SECONDS = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_answers(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def serves_tables(port: int) -> bool:
    """Whether the server on the port is Azurite's table service (and not some other program)."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", f"/{ACCOUNT}/Tables")
            response = connection.getresponse()
            response.read()
            return (response.getheader("Server") or "").startswith("Azurite-Table")
        finally:
            connection.close()
    except (OSError, http.client.HTTPException):
        return False


class _PortTaken(Exception):
    pass


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"TableEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def unique_table_name() -> str:
    return "t" + uuid.uuid4().hex[:24]


class AzuriteServer:
    """`with AzuriteServer() as azurite:` -- in memory, or persisting to `location`."""

    def __init__(self, location: Path | None = None, port: int | None = None) -> None:
        self.location = location
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        node = shutil.which("node")
        script = AZURITE_BIN if AZURITE_BIN.exists() else AZURITE_TABLE
        if node is None or not script.exists():
            raise RuntimeError(
                "Azurite is not installed: run `make install` (npm ci installs the pinned azurite "
                "from package-lock.json into node_modules)"
            )
        command = [node, str(script)]
        if self.location is None:
            command.append("--inMemoryPersistence")
        else:
            command += ["--location", str(self.location)]
        return command + ["--tableHost", "127.0.0.1", "--tablePort", str(self.port), "--disableTelemetry", "--silent"]

    def start(self, attempts: int = 3) -> AzuriteServer:
        """Start and wait until this very process answers. A free port can be taken by another
        program between the probe and Azurite's bind: then Azurite exits, and a fresh port is
        tried (unless the port was chosen by the caller, as a restart on disk does)."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except _PortTaken:
                if attempt + 1 == attempts or self._fixed_port:
                    raise RuntimeError(f"Azurite could not listen on 127.0.0.1:{self.port}") from None
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> AzuriteServer:
        if self.location is not None:
            self.location.mkdir(parents=True, exist_ok=True)
        cwd = self.location or Path(tempfile.gettempdir())  # whatever it writes stays out of the repository
        self.process = subprocess.Popen(
            self.command(), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_SECONDS
        while not (port_answers(self.port) and self.process.poll() is None and serves_tables(self.port)):
            if self.process.poll() is not None:
                error = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                self.process = None
                if "EADDRINUSE" in error:
                    raise _PortTaken()
                raise RuntimeError(f"Azurite exited: {error.strip()[:500]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Azurite did not answer on 127.0.0.1:{self.port} within {START_SECONDS:g} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGINT by PID, which Azurite handles by saving its database and exiting (SIGTERM would
        end it unsaved: it autosaves only every 5 s); SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()
        deadline = time.monotonic() + 5
        while port_answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> AzuriteServer:
        """Stop, then start on the same port (and folder): clients keep their connection string."""
        self.stop()
        fixed, self._fixed_port = self._fixed_port, True
        try:
            return self.start()
        finally:
            self._fixed_port = fixed

    def __enter__(self) -> AzuriteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpProxy:
    """A loopback TCP forwarder to `target_port` that a test can cut (`down()`) and restore (`up()`).

    While down it refuses new connections and drops the open ones: the storage account as seen
    by a client whose network just failed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepting: threading.Thread | None = None

    def up(self) -> TcpProxy:
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()
        return self

    def down(self) -> TcpProxy:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._accepting is not None:
            self._accepting.join(timeout=5)
            self._accepting = None
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> TcpProxy:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def wall_clock_ahead(folder: Path, seconds: float, env: dict[str, str]) -> dict[str, str]:
    """The environment for a Python subprocess whose `time.time()` reads `seconds` later: the
    next timer run, after a dead run's claim leases (wall-clock, at least a minute) ran out.
    Only the stdlib clock moves (through a sitecustomize module); the code under test is as is.
    The run's own clock is `--now`; TLS and Storage request signing use `datetime`, not this."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import time as _time\n"
        "_real_time = _time.time\n"
        f"_time.time = lambda: _real_time() + {float(seconds)!r}\n",
        encoding="utf-8",
    )
    path = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}


@pytest.fixture(scope="session")
def azurite() -> Iterator[AzuriteServer]:
    """The session's in-memory Azurite table service."""
    try:
        server = AzuriteServer().start()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azurite_table(azurite: AzuriteServer) -> str:
    """A table name no other test uses (the store creates the table)."""
    return unique_table_name()


@pytest.fixture
def table_state_values(azurite: AzuriteServer, azurite_table: str) -> dict[str, str]:
    """Settings values for STATE_STORE=table on the session's Azurite, in a fresh table."""
    return {
        "STATE_STORE": "table",
        "STATE_CONNECTION": azurite.connection_string,
        "STATE_TABLE_NAME": azurite_table,
    }


@pytest.fixture
def azurite_on_disk(tmp_path: Path) -> Iterator[AzuriteServer]:
    """An Azurite of this test's own that persists to disk: `restart()` keeps the data and port."""
    try:
        server = AzuriteServer(location=tmp_path / "azurite").start()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
