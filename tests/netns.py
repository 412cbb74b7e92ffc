"""Hosts for tests: Linux network namespaces on this machine, joined by a bridge of their own.

Each host is a namespace with a veth pair whose other end is on a bridge inside the `services`
namespace, which has the first address of the subnet and runs the shared services (a private Postgres
from the installed binaries, redis-server, the S3 server). No interface of the machine's own namespace
is on that network: the test process reaches a host's port through a forwarder that listens on this
machine's loopback and connects from inside the host's namespace (as `kubectl port-forward` does), so
every packet between the hosts stays among the namespaces the test made.

`python -m tests.netns forward NAMESPACE ADDRESS PORT` is that forwarder.
"""

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"  # inside the test's own namespaces only: it can never clash with the machine's routes


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    namespace: str
    address: str

    def command(self, *command: str) -> list[str]:
        """`command` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]


@dataclass
class Network:
    """A bridge in the `services` namespace, and hosts plugged into it, named uniquely for this run."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    hosts: list[Host] = field(default_factory=list)
    forwarders: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.services = self._namespace("services", 1)
        bridge = ["ip", "netns", "exec", self.services.namespace, "ip"]
        subprocess.run([*bridge, "link", "add", "br0", "type", "bridge"], check=True)
        subprocess.run([*bridge, "addr", "add", f"{self.services.address}/24", "dev", "br0"], check=True)
        subprocess.run([*bridge, "link", "set", "br0", "up"], check=True)

    def _namespace(self, name: str, number: int) -> Host:
        host = Host(f"tf-{self.tag}-{name}", f"{SUBNET}.{number}")
        ip("netns", "add", host.namespace)
        self.hosts.append(host)
        ip("-n", host.namespace, "link", "set", "lo", "up")
        return host

    def add_host(self, name: str) -> Host:
        """A new namespace with an address on the bridge."""
        number = len(self.hosts) + 1
        host = self._namespace(name, number)
        inside, outside = f"tf{self.tag}{number}a", f"tf{self.tag}{number}b"  # at most 15 characters
        ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        ip("link", "set", inside, "netns", host.namespace)
        ip("link", "set", outside, "netns", self.services.namespace)
        ip("-n", self.services.namespace, "link", "set", outside, "master", "br0")
        ip("-n", self.services.namespace, "link", "set", outside, "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inside)
        ip("-n", host.namespace, "link", "set", inside, "up")
        return host

    def forward(self, host: Host, port: int) -> int:
        """A port on this machine's loopback that reaches `port` on `host`; returns it."""
        forwarder = subprocess.Popen(
            [sys.executable, "-m", "tests.netns", "forward", host.namespace, host.address, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.forwarders.append(forwarder)
        assert forwarder.stdout is not None
        return int(forwarder.stdout.readline())

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.kill()
            forwarder.wait()
        for host in self.hosts:  # a namespace's veth ends go with it
            subprocess.run(["ip", "netns", "del", host.namespace], check=False, capture_output=True)


@contextlib.contextmanager
def private_postgres(network: Network, log: Path) -> Iterator[str]:
    """A Postgres of its own (the installed initdb and postgres binaries) in the services namespace;
    yields its URL as the hosts see it. It runs as the `postgres` user: Postgres refuses root."""
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, "initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    with (folder / "data" / "pg_hba.conf").open("a") as hba:  # the hosts of the test's subnet, no password
        hba.write("host all all samenet trust\n")
    options = f"listen_addresses={network.services.address}"
    server = subprocess.Popen(
        network.services.command(
            *as_postgres,
            "postgres",
            "-D",
            str(folder / "data"),
            "-k",
            str(folder),
            "-c",
            options,
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"postgresql+psycopg://postgres@{network.services.address}:5432/postgres"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def _enter(namespace: str) -> None:
    """Move this process (its only thread) into `namespace`'s network."""
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into {namespace}")
    os.close(fd)


def _pump(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


def _serve(client: socket.socket, address: str, port: int) -> None:
    try:
        upstream = socket.create_connection((address, port))
    except OSError:
        client.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def forward(namespace: str, address: str, port: int) -> None:
    """Listen on this machine's loopback (bound before leaving its namespace), then connect each client
    to `address:port` from inside `namespace`."""
    listener = socket.create_server(("127.0.0.1", 0))
    _enter(namespace)  # sockets made from here on belong to the host's network; the listener stays here
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve, args=(client, address, port), daemon=True).start()


if __name__ == "__main__" and sys.argv[1] == "forward":
    forward(sys.argv[2], sys.argv[3], int(sys.argv[4]))
