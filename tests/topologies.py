"""Real Redis deployments on loopback ports for the topology tests: TLS, a unix socket,
Sentinel and Cluster (each of the last two with or without TLS).

Each needs a redis-server built with TLS and Sentinel support from PATH (Debian's redis-server
and redis-sentinel packages, which ``.ci/run`` installs when missing). Without one the tests
skip locally and fail under CI. Every server runs in the test's own folder (its working
directory and ``dir``), so nothing it writes (a dump for a replica's sync, cluster node files)
lands in the checkout.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
import redis.cluster

from .conftest import free_port, needs, stop_process, wait_until


def system_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        needs("redis-server is not on PATH (Debian: redis-server)")
    return binary


def sentinel_command(config: Path) -> list[str]:
    binary = shutil.which("redis-sentinel")
    if binary is not None:
        return [binary, str(config)]
    return [system_redis_server(), str(config), "--sentinel"]


def redis_cli() -> str:
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli comes with redis-server"
    return cli


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    cmd: list[str] = field(default_factory=list)

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing saved or handed over."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def spawn(cmd: list[str], port: int, log: Path, ready: Callable[[], bool]) -> Process:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    process = Process(proc, port, log, cmd)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd[0]} exited:\n{log.read_text()}")
        try:
            return ready()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False

    try:
        wait_until(up, 15, interval=0.05, what=f"{' '.join(cmd[:2])} on port {port}")
    except BaseException:
        process.stop()
        raise
    return process


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for 127.0.0.1, its own CA."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> Certificate:
        cert, key = folder / "cert.pem", folder / "key.pem"
        if not cert.exists():
            subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", str(key), "-out", str(cert), *subject],
                check=True, capture_output=True,
            )  # fmt: skip
        return cls(cert, key)

    def server_args(self) -> list[str]:
        """redis-server options: serve TLS with this certificate; clients need none."""
        return [
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def client_options(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.cert)}


def server_args(folder: Path, port: int, tls: Certificate | None, *extra: str) -> list[str]:
    """A redis-server on ``port`` (TLS only when ``tls``), without persistence, in ``folder``."""
    listen = ["--port", str(port)] if tls is None else ["--port", "0", "--tls-port", str(port)]
    secure = [] if tls is None else [*tls.server_args(), "--tls-replication", "yes"]
    return [
        system_redis_server(), *listen, "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(folder), *secure, *extra,
    ]  # fmt: skip


@dataclass
class TLSRedis:
    """A redis-server that speaks TLS only, with a password, and a self-signed certificate."""

    dir: Path
    password: str = "s3cret-pw"
    server: Process | None = None
    port: int = 0
    #: an ACL user besides the default one (``app``, with every command and key)
    acl_user: tuple[str, str] = ("app", "app-pw-7")

    @property
    def ca(self) -> Path:
        return self.dir / "cert.pem"

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    @property
    def acl_url(self) -> str:
        user, password = self.acl_user
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    def start(self) -> TLSRedis:
        certificate = Certificate.make(self.dir)
        self.port = port = free_port()
        user, password = self.acl_user
        cmd = server_args(
            self.dir, port, certificate, "--requirepass", self.password,
            "--user", user, "on", f">{password}", "~*", "&*", "+@all",
        )  # fmt: skip
        self.server = spawn(
            cmd, port, self.dir / "redis-tls.log", lambda: bool(self.client().ping())
        )
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class UnixRedis:
    """A redis-server that listens on a unix socket only."""

    dir: Path
    server: Process | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self) -> UnixRedis:
        cmd = server_args(self.dir, 0, None, "--unixsocket", str(self.socket))
        self.server = spawn(cmd, 0, self.dir / "redis-unix.log", lambda: bool(self.client().ping()))
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), decode_responses=True)

    def restart(self) -> None:
        """Stop it and start it again on the same socket, empty."""
        assert self.server is not None
        self.server.stop()
        self.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class SentinelSetup:
    """A master, a replica and three sentinels (quorum 2) watching "mymaster"; with ``tls``,
    every one of them speaks TLS only."""

    dir: Path
    tls: bool = False
    service: str = "mymaster"
    servers: list[Process] = field(default_factory=list)
    sentinels: list[Process] = field(default_factory=list)
    certificate: Certificate | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        if self.certificate is None:
            return f"redis+sentinel://{hosts}/{self.service}/0"
        return f"rediss+sentinel://{hosts}/{self.service}/0?ssl_ca_certs={self.certificate.cert}"

    @property
    def kombu_url(self) -> str:
        """The same sentinels as Celery's own broker setting spells them."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels)

    def client(self, port: int, **options: Any) -> redis.Redis:
        tls = {} if self.certificate is None else self.certificate.client_options()
        return redis.Redis(host="127.0.0.1", port=port, **tls, **options)

    def start(self) -> SentinelSetup:
        self.certificate = Certificate.make(self.dir) if self.tls else None
        master_port, replica_port = free_port(), free_port()
        for name, port, extra in (
            ("master", master_port, []),
            ("replica", replica_port, ["--replicaof", "127.0.0.1", str(master_port)]),
        ):
            cmd = server_args(self.dir, port, self.certificate, *extra)
            ready = lambda p=port: bool(self.client(p).ping())  # noqa: E731
            self.servers.append(spawn(cmd, port, self.dir / f"{name}.log", ready))
        wait_until(
            lambda: self.client(replica_port).info("replication").get("master_link_status") == "up",
            15,
            what="the replica to sync",
        )
        for i in range(3):
            port = free_port()
            config = self.dir / f"sentinel{i}.conf"
            listen = f"port {port}\n"
            if self.certificate is not None:
                cert, key = self.certificate.cert, self.certificate.key
                listen = (
                    f"port 0\ntls-port {port}\ntls-replication yes\ntls-auth-clients no\n"
                    f"tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {cert}\n"
                )
            config.write_text(
                f"{listen}bind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            ready = lambda p=port: bool(self.client(p).ping())  # noqa: E731
            self.sentinels.append(
                spawn(sentinel_command(config), port, self.dir / f"sentinel{i}.log", ready)
            )
        wait_until(
            self._all_sentinels_see_each_other,
            30,
            interval=0.2,
            what="the sentinels to find each other and the replica",
        )
        return self

    def _all_sentinels_see_each_other(self) -> bool:
        for sentinel in self.sentinels:
            client = self.client(sentinel.port, decode_responses=True)
            fields = cast(dict[str, Any], client.sentinel_master(self.service))
            if int(fields["num-other-sentinels"]) < 2 or int(fields["num-slaves"]) < 1:
                return False
        return True

    def _master_by(self, sentinel: Process) -> int:
        reply = self.client(sentinel.port, decode_responses=True).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return int(reply[1])

    def master_port(self) -> int:
        return self._master_by(self.sentinels[0])

    def server(self, port: int) -> Process:
        return next(s for s in self.servers if s.port == port)

    def role(self, port: int) -> str:
        """ "master" or "slave": what the server on ``port`` says it is."""
        return str(self.client(port).info("replication")["role"])

    def failover(self) -> int:
        """Force a failover; returns the new master's port once every sentinel agrees."""
        before = self.master_port()
        self.client(self.sentinels[0].port).execute_command("SENTINEL", "FAILOVER", self.service)
        return self.wait_new_master(before)

    def wait_new_master(self, before: int, timeout: float = 30) -> int:
        """Wait until every sentinel names a master other than ``before``, and it is one."""

        def moved() -> bool:
            ports = {self._master_by(s) for s in self.sentinels}
            if len(ports) != 1 or ports.pop() == before:
                return False
            return self.role(self.master_port()) == "master"

        wait_until(moved, timeout, interval=0.1, what="the failover to complete")
        return self.master_port()

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


@dataclass
class ClusterSetup:
    """Three primaries (no replicas) holding all 16384 slots; with ``tls``, TLS only (the
    cluster bus too)."""

    dir: Path
    tls: bool = False
    nodes: list[Process] = field(default_factory=list)
    certificate: Certificate | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])
        if self.certificate is None:
            return f"redis+cluster://{hosts}"
        return f"rediss+cluster://{hosts}?ssl_ca_certs={self.certificate.cert}"

    def client(self, port: int, **options: Any) -> redis.Redis:
        tls = {} if self.certificate is None else self.certificate.client_options()
        return redis.Redis(host="127.0.0.1", port=port, **tls, **options)

    def cluster_client(self) -> redis.cluster.RedisCluster:
        tls = {} if self.certificate is None else self.certificate.client_options()
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, **tls)

    def start(self) -> ClusterSetup:
        self.certificate = Certificate.make(self.dir) if self.tls else None
        for i in range(3):
            port = cluster_port()
            cmd = server_args(
                self.dir, port, self.certificate, "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "2000",
                *([] if self.certificate is None else ["--tls-cluster", "yes"]),
            )  # fmt: skip
            ready = lambda p=port: bool(self.client(p).ping())  # noqa: E731
            self.nodes.append(spawn(cmd, port, self.dir / f"node{i}.log", ready))
        tls = [] if self.certificate is None else ["--tls", "--cacert", str(self.certificate.cert)]
        created = subprocess.run(
            [redis_cli(), *tls, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        self.wait_ok()
        return self

    def wait_ok(self) -> None:
        def ok() -> bool:
            return all(
                self.client(n.port).cluster("info")["cluster_state"] == "ok" for n in self.nodes
            )

        wait_until(ok, 30, interval=0.1, what="the cluster to be ok on every node")

    def node_id(self, port: int) -> str:
        return str(self.client(port, decode_responses=True).cluster("myid"))

    def owner(self, slot: int) -> int:
        """The port of the primary that serves ``slot``, as the first node sees it."""
        for start, end, primary, *_ in self.client(self.nodes[0].port).cluster("slots"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"no node serves slot {slot}")

    def keyslot(self, key: str) -> int:
        return int(self.client(self.nodes[0].port).cluster("keyslot", key))

    def restart(self, port: int) -> None:
        """SIGKILL the node on ``port`` and start it again: its slots (in its node file) stay,
        its data is gone."""
        index = next(i for i, n in enumerate(self.nodes) if n.port == port)
        node = self.nodes[index]
        node.kill()
        ready = lambda: bool(self.client(port).ping())  # noqa: E731
        self.nodes[index] = spawn(node.cmd, port, node.log, ready)
        self.wait_ok()

    def move_slot(self, slot: int, target: int) -> None:
        """Migrate ``slot`` and its keys to the node on ``target``, as ``redis-cli --cluster
        reshard`` does: IMPORTING / MIGRATING, MIGRATE of every key, then the new owner."""
        source = self.owner(slot)
        src, dst = self.client(source), self.client(target)
        dst.cluster("setslot", slot, "importing", self.node_id(source))
        src.cluster("setslot", slot, "migrating", self.node_id(target))
        while keys := src.cluster("getkeysinslot", slot, 100):
            src.migrate("127.0.0.1", target, keys, 0, 5000)
        for node in self.nodes:
            self.client(node.port).cluster("setslot", slot, "node", self.node_id(target))
        wait_until(lambda: all(self._sees(n.port, slot, target) for n in self.nodes), 15,
                   what=f"every node to see slot {slot} on {target}")  # fmt: skip

    def _sees(self, port: int, slot: int, target: int) -> bool:
        for start, end, primary, *_ in self.client(port).cluster("slots"):
            if start <= slot <= end:
                return int(primary[1]) == target
        return False

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
