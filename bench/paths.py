"""The paths measured: where the load generator connects, and the processes in between.

- ``direct``: straight to the echo upstream, the physical limit;
- ``nginx``: nginx as a plain WebSocket reverse proxy, one worker (installed from Debian's
  package where missing and we are root; skipped with a message otherwise);
- ``relay``: this relay with auth, session defaults and rules, and metrics on;
- ``relay-w2``: the relay with ``--workers 2`` (skipped as pending where `relay serve` has
  no ``--workers``);
- ``relay-preview``: the relay with a preview-dialect client on the GA deployment
  (``/openai/realtime?api-version=2024-10-01-preview``), so every event is translated: the
  cost of translation is this path's CPU per frame against ``relay``'s;
- ``picows``: a bare picows relay (`bench/picows_relay.py`), the floor for Python (skipped
  where picows is not installed: it comes with the bench extra);
- ``litellm``: LiteLLM's proxy, its realtime route with an Azure model pointing at the echo
  upstream's TLS listener (skipped where `make bench-peers` has not installed it into
  bench/.venv-litellm).

``--gc-log`` runs the relay paths with a prelude that logs garbage-collection pauses (one
process only: `--workers` children are started by the relay itself, without it).

Every proxy is started fresh for each run, so each run's memory starts from the same place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
REALTIME_PATH = "/openai/v1/realtime?model=bench"
# Where a preview-era client (Azure's rtclient, LiveKit's Azure mode) connects.
PREVIEW_CLIENT_PATH = "/openai/realtime?api-version=2024-10-01-preview&deployment=bench"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
START_TIMEOUT_S = 30.0
# The relay's session duration limit in the bench config (a typical app's); the soak raises
# it above its own length.
MAX_SESSION_S = 1800.0
# A prelude run before the relay's own command line (``python -c``), without touching relay/.
# Logs every garbage collection pause over 1 ms: "bench_gc_pause <end ns> <generation> <ms>".
_GC_LOG = """import gc, time
_began = [0]
def _bench_gc(phase, info):
    if phase == "start":
        _began[0] = time.monotonic_ns()
        return
    ended = time.monotonic_ns()
    if ended - _began[0] > 1_000_000:
        print("bench_gc_pause", ended, info["generation"], (ended - _began[0]) / 1e6,
              file=sys.stderr, flush=True)
gc.callbacks.append(_bench_gc)
"""
_MAIN = "from relay.cli import main\nsys.exit(main())\n"


# LiteLLM's own venv (`make bench-peers`, bench/requirements-litellm.txt).
LITELLM_VENV = BENCH_DIR / ".venv-litellm"
# LiteLLM imports a great deal before it listens: on 2 busy cores, 20 s and more.
LITELLM_START_TIMEOUT_S = 120.0
# Largest event the peers are configured to take: above the 8 MiB memory scenario.
PEER_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class PathError(RuntimeError):
    """A path could not be started."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a generator connects, with the headers it presents. The echo upstream also
    gives its TLS listener's port and the CA file that signs its certificate (peers that
    dial only wss://), where it has one."""

    host: str
    port: int
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    tls_port: int | None = None
    ca_file: str | None = None


class Child:
    """A process the bench started, its output in a log file; stopped by its own pid."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_DIR,
                env=env,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_listening(
    port: int,
    child: Child,
    *,
    http_path: str | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Until 127.0.0.1:port accepts (and answers ``http_path`` with 200), bounded in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise PathError(f"exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            if http_path is None:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            url = f"http://127.0.0.1:{port}{http_path}"
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise PathError(f"not listening on {port} after {timeout_s:g} s:\n{child.tail()}")


def announced_ports(child: Child, labels: Sequence[str] = ("PORT",)) -> dict[str, int]:
    """The ports a child prints as ``<LABEL> <port>`` lines (the bench's own servers), once
    it has printed every one of ``labels``; bounded in time."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and child.alive():
        found = {}
        for line in child.log.read_text(errors="replace").splitlines():
            label, _, port = line.partition(" ")
            if label in labels and port.isdigit():
                found[label] = int(port)
        if len(found) == len(labels):
            return found
        time.sleep(0.05)
    raise PathError(f"announced no {' and '.join(labels)} in time:\n{child.tail()}")


def free_port() -> int:
    """A port free on 127.0.0.1 now (bound and released: fine on a loopback-only bench)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render(template: str, values: dict[str, object]) -> str:
    text = (BENCH_DIR / template).read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", str(value))
    return text


class BenchPath:
    """A path: ``start`` returns where clients connect; ``pids`` are what it costs."""

    name = "path"
    # Why the path cannot run here, or None.
    pending: str | None = None

    def start(self, upstream: Endpoint, work: Path) -> Endpoint:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        return None

    def gc_pauses(self, start_ns: int, end_ns: int) -> list[tuple[int, float]] | None:
        """GC pauses in the window, (generation, ms), where the path records them."""
        return None


class DirectPath(BenchPath):
    name = "direct"

    def start(self, upstream: Endpoint, work: Path) -> Endpoint:
        return upstream


class ChildPath(BenchPath):
    """A path that is one process (and its children) the bench starts and stops."""

    def __init__(self) -> None:
        self.child: Child | None = None

    def pids(self) -> list[int]:
        return [self.child.pid] if self.child is not None else []

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


class NginxPath(ChildPath):
    name = "nginx"

    def __init__(self) -> None:
        super().__init__()
        self.binary, self.pending = ensure_nginx()

    def start(self, upstream: Endpoint, work: Path) -> Endpoint:
        assert self.binary is not None
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = work / "nginx.conf"
        conf.write_text(
            render(
                "nginx.conf.template", {"DIR": work, "PORT": port, "UPSTREAM_PORT": upstream.port}
            )
        )
        error_log = str(work / "error.log")
        self.child = Child(
            [self.binary, "-p", str(work), "-c", str(conf), "-e", error_log], work / "nginx.out"
        )
        try:
            wait_listening(port, self.child)
        except PathError:
            self.stop()
            raise
        return Endpoint("127.0.0.1", port, upstream.path, dict(upstream.headers))


class RelayPath(ChildPath):
    """`relay serve` with the bench config, plus extra command-line arguments."""

    def __init__(
        self,
        name: str,
        upstream_key: str,
        *,
        extra_args: Sequence[str] = (),
        gc_log: bool = False,
        needs_option: str | None = None,
        client_path: str = REALTIME_PATH,
    ) -> None:
        super().__init__()
        self.name = name
        self.client_path = client_path
        self.upstream_key = upstream_key
        self.extra_args = list(extra_args)
        self.gc_log = gc_log
        self.log: Path | None = None
        self.client_key = "rk-bench-" + os.urandom(12).hex()
        self.max_session_s = MAX_SESSION_S
        if needs_option is not None and needs_option not in _relay_serve_help():
            self.pending = f"pending: `relay serve` has no {needs_option} option yet"

    def command(self, config: Path, port: int) -> list[str]:
        head = _relay_command()
        if self.gc_log:
            head = [sys.executable, "-c", "import sys\n" + _GC_LOG + _MAIN]
        return [*head, "serve", "--config", str(config), "--port", str(port), *self.extra_args]

    def gc_pauses(self, start_ns: int, end_ns: int) -> list[tuple[int, float]] | None:
        """(generation, ms) of each GC pause that ended in [start_ns, end_ns) (with gc_log)."""
        if not self.gc_log or self.log is None or not self.log.exists():
            return None
        pauses = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("bench_gc_pause "):
                _, ended, generation, millis = line.split()
                if start_ns <= int(ended) < end_ns:
                    pauses.append((int(generation), float(millis)))
        return pauses

    def start(self, upstream: Endpoint, work: Path) -> Endpoint:
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = work / "relay.toml"
        key_hash = "sha256:" + hashlib.sha256(self.client_key.encode()).hexdigest()
        config.write_text(
            render(
                "relay.toml.template",
                {
                    "PORT": port,
                    "METRICS_PORT": free_port(),
                    "UPSTREAM": f"http://{upstream.host}:{upstream.port}",
                    "KEY_HASH": key_hash,
                    "MAX_SESSION_SECONDS": int(self.max_session_s),
                },
            )
        )
        env = {**os.environ, UPSTREAM_KEY_ENV: self.upstream_key}
        self.log = work / "relay.log"
        self.child = Child(self.command(config, port), self.log, env)
        try:
            wait_listening(port, self.child, http_path="/readyz")
        except PathError:
            self.stop()
            raise
        return Endpoint("127.0.0.1", port, self.client_path, {"api-key": self.client_key})

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(grace_s=15.0)
            self.child = None


class PicowsPath(ChildPath):
    """The bare picows relay (`bench/picows_relay.py`): the floor for a Python relay. It
    holds the upstream key itself and asks clients for none."""

    name = "picows"

    def __init__(self, upstream_key: str) -> None:
        super().__init__()
        self.upstream_key = upstream_key
        if importlib.util.find_spec("picows") is None:
            self.pending = "skipped: picows is not installed (it comes with the bench extra)"

    def start(self, upstream: Endpoint, work: Path) -> Endpoint:
        work.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "bench.picows_relay", "--key-env", UPSTREAM_KEY_ENV]
        argv += ["--upstream", f"ws://{upstream.host}:{upstream.port}"]
        env = {**os.environ, UPSTREAM_KEY_ENV: self.upstream_key}
        self.child = child = Child(argv, work / "picows.log", env)
        try:
            port = announced_ports(child)["PORT"]
        except PathError:
            self.stop()
            raise
        return Endpoint("127.0.0.1", port, upstream.path)


class LitellmPath(ChildPath):
    """LiteLLM's proxy from its own venv: the realtime route (`/openai/v1/realtime`), a
    master key for auth, and an Azure model whose `api_base` is the echo upstream's TLS
    listener. LiteLLM's Azure route dials wss:// only; it trusts the bench's CA through
    SSL_CERT_FILE, which its SSL configuration reads (litellm's get_ssl_configuration)."""

    name = "litellm"

    def __init__(self, upstream_key: str) -> None:
        super().__init__()
        self.upstream_key = upstream_key
        self.master_key = "sk-bench-" + os.urandom(12).hex()
        self.binary = LITELLM_VENV / "bin" / "litellm"
        if not self.binary.exists():
            self.pending = (
                "skipped: LiteLLM is not installed; `make bench-peers` installs it into "
                f"{LITELLM_VENV.relative_to(REPO_DIR)}"
            )

    def start(self, upstream: Endpoint, work: Path) -> Endpoint:
        if upstream.tls_port is None or upstream.ca_file is None:
            raise PathError("the echo upstream has no TLS listener (is trustme installed?)")
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = work / "litellm.yaml"
        config.write_text(
            render(
                "litellm.yaml.template",
                {"API_BASE": f"https://127.0.0.1:{upstream.tls_port}", "KEY_ENV": UPSTREAM_KEY_ENV},
            )
        )
        env = {
            **os.environ,
            UPSTREAM_KEY_ENV: self.upstream_key,
            "BENCH_LITELLM_MASTER_KEY": self.master_key,
            "SSL_CERT_FILE": upstream.ca_file,
            # The bundled model cost map: no fetch from the network at start-up.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # websockets' default is 1 MiB: the large-event scenarios need more, as would
            # a team forwarding real `conversation.item` events.
            "REALTIME_WEBSOCKET_MAX_MESSAGE_SIZE_BYTES": str(PEER_MAX_MESSAGE_BYTES),
            "LITELLM_LOG": "ERROR",
        }
        argv = [str(self.binary), "--config", str(config), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--num_workers", "1"]
        self.child = child = Child(argv, work / "litellm.log", env)
        try:
            wait_listening(
                port, child, http_path="/health/liveliness", timeout_s=LITELLM_START_TIMEOUT_S
            )
        except PathError:
            self.stop()
            raise
        return Endpoint(
            "127.0.0.1", port, REALTIME_PATH, {"Authorization": f"Bearer {self.master_key}"}
        )


def _relay_command() -> list[str]:
    script = Path(sys.executable).with_name("relay")
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay"]


def _relay_serve_help() -> str:
    try:
        done = subprocess.run(
            [*_relay_command(), "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_DIR,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_nginx() -> tuple[str | None, str | None]:
    """nginx's binary, installing Debian's package when missing and root; or why not."""
    binary = find_nginx()
    if binary is not None:
        return binary, None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "skipped: nginx is not installed and apt-get cannot be run as root here"
    print("bench: nginx is missing; installing Debian's nginx package", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"]
    for step in (install, ["apt-get", "update", "-qq"], install):
        try:
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            continue
        if step is install and done.returncode == 0:
            break
    binary = find_nginx()
    if binary is None:
        return None, "skipped: installing nginx with apt-get failed"
    return binary, None
