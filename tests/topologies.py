"""Real Redis deployments on loopback ports for the topology tests: TLS, Sentinel, Cluster.

Each needs a redis-server built with TLS and Sentinel support from PATH (Debian's redis-server
and redis-sentinel packages, which ``.ci/run`` installs when missing). Without one the tests
skip locally and fail under CI. Every server runs in the test's own folder (its working
directory and ``dir``), so nothing it writes (a dump for a replica's sync, cluster node files)
lands in the checkout.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

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


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        stop_process(self.proc)


def spawn(cmd: list[str], port: int, log: Path, ready: Callable[[], bool]) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    process = Process(proc, port, log)

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


@dataclass
class TLSRedis:
    """A redis-server that speaks TLS only, with a password, and a self-signed certificate."""

    dir: Path
    password: str = "s3cret-pw"
    server: Process | None = None

    @property
    def ca(self) -> Path:
        return self.dir / "cert.pem"

    port: int = 0
    #: an ACL user besides the default one (``app``, with every command and key)
    acl_user: tuple[str, str] = ("app", "app-pw-7")

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    @property
    def acl_url(self) -> str:
        user, password = self.acl_user
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    def start(self) -> TLSRedis:
        binary = system_redis_server()
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                str(self.dir / "key.pem"),
                "-out",
                str(self.ca),
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        self.port = port = free_port()
        cmd = [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(self.ca),
            "--tls-key-file",
            str(self.dir / "key.pem"),
            "--tls-ca-cert-file",
            str(self.ca),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            self.password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--user",
            self.acl_user[0],
            "on",
            f">{self.acl_user[1]}",
            "~*",
            "&*",
            "+@all",
        ]
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
class SentinelSetup:
    """A master, a replica and three sentinels (quorum 2) watching "mymaster"."""

    dir: Path
    service: str = "mymaster"
    servers: list[Process] = field(default_factory=list)
    sentinels: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> SentinelSetup:
        binary = system_redis_server()
        master_port, replica_port = free_port(), free_port()
        for name, port, extra in (
            ("master", master_port, []),
            ("replica", replica_port, ["--replicaof", "127.0.0.1", str(master_port)]),
        ):
            cmd = [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *extra,
            ]
            self.servers.append(
                spawn(
                    cmd,
                    port,
                    self.dir / f"{name}.log",
                    lambda p=port: bool(redis.Redis(port=p).ping()),
                )
            )
        wait_until(
            lambda: (
                redis.Redis(port=replica_port).info("replication").get("master_link_status") == "up"
            ),
            15,
            what="the replica to sync",
        )
        for i in range(3):
            port = free_port()
            config = self.dir / f"sentinel{i}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(
                spawn(
                    sentinel_command(config),
                    port,
                    self.dir / f"sentinel{i}.log",
                    lambda p=port: bool(redis.Redis(port=p).ping()),
                )
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
            fields = redis.Redis(port=sentinel.port, decode_responses=True).sentinel_master(
                self.service
            )
            if int(fields["num-other-sentinels"]) < 2 or int(fields["num-slaves"]) < 1:
                return False
        return True

    def master_port(self) -> int:
        reply = redis.Redis(port=self.sentinels[0].port, decode_responses=True).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return int(reply[1])

    def role(self, port: int) -> str:
        """ "master" or "slave": what the server on ``port`` says it is."""
        return str(redis.Redis(port=port).info("replication")["role"])

    def failover(self) -> int:
        """Force a failover; returns the new master's port once every sentinel agrees."""
        before = self.master_port()
        redis.Redis(port=self.sentinels[0].port).execute_command(
            "SENTINEL", "FAILOVER", self.service
        )

        def moved() -> bool:
            ports = {
                redis.Redis(port=s.port, decode_responses=True).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                )[1]
                for s in self.sentinels
            }
            if len(ports) != 1 or int(ports.pop()) == before:
                return False
            role = redis.Redis(port=self.master_port()).info("replication")["role"]
            return bool(role == "master")

        wait_until(moved, 30, interval=0.1, what="the failover to complete")
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
    """Three primaries (no replicas) holding all 16384 slots."""

    dir: Path
    nodes: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def start(self) -> ClusterSetup:
        binary = system_redis_server()
        for i in range(3):
            port = cluster_port()
            cmd = [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                "2000",
            ]
            self.nodes.append(
                spawn(
                    cmd,
                    port,
                    self.dir / f"node{i}.log",
                    lambda p=port: bool(redis.Redis(port=p).ping()),
                )
            )
        cli = shutil.which("redis-cli")
        assert cli is not None, "redis-cli comes with redis-server"
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr

        def ok() -> bool:
            return all(
                redis.Redis(port=n.port).cluster("info")["cluster_state"] == "ok"
                for n in self.nodes
            )

        wait_until(ok, 30, interval=0.1, what="the cluster to be ok on every node")
        return self

    def node_of(self, key: str) -> int:
        """The port of the primary that holds ``key``."""
        slot = redis.Redis(port=self.nodes[0].port).cluster("keyslot", key)
        for node in self.nodes:
            owned = redis.Redis(port=node.port).cluster("countkeysinslot", slot)
            if redis.Redis(port=node.port).exists(key) or owned:
                return node.port
        raise AssertionError(f"no node holds {key}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
