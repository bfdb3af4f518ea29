"""Credentials and TLS: the ACL as pure rules, then real Mosquitto enforcing it on real clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from paho.mqtt.client import topic_matches_sub

from jarvis_mqtt import security, transport
from jarvis_mqtt import topics as T
from jarvis_mqtt.brokers import BrokerAddress, BrokerSecurity, MosquittoBroker, render_config
from jarvis_mqtt.cli_ops import main as ops_main
from jarvis_mqtt.errors import ConfigError, MeshError
from jarvis_mqtt.mesh_auth import MeshAuth
from jarvis_mqtt.transport import MeshClient, MeshMessage

R = TypeVar("R")
NODES, CLIENTS, MONITORS = ("node-a", "node-b"), ("alice", "bob"), ("mon",)


def run(coro: Coroutine[Any, Any, R], timeout: float = 30.0) -> R:
    """Run one test coroutine with a hard bound."""

    async def bounded() -> R:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(autouse=True)
def no_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MeshClient falls back to JARVIS_MQTT_*: an anonymous client here must really be one."""
    for key in [k for k in os.environ if k.startswith("JARVIS_MQTT_")]:
        monkeypatch.delenv(key)


def allowed(role: str, user: str, access: str, topic: str, root: str = "jarvis") -> bool:
    """Whether the rules of `role` let `user` read or write `topic` (as Mosquitto matches)."""
    return any(
        r.access == access and topic_matches_sub(r.topic, topic)
        for r in security.acl_rules(role, user, root)
    )


# -- the ACL as pure rules -----------------------------------------------------------------------


def test_node_rights() -> None:
    t = T.Topics("jarvis")
    assert allowed("node", "a", "read", t.node_layer("m", 3, "a"))
    assert not allowed("node", "a", "read", t.node_layer("m", 3, "b"))  # another node's work
    assert allowed("node", "a", "read", t.layer("m", 3))  # addressed to whoever hosts it
    assert allowed("node", "a", "write", t.node_layer("m", 4, "b"))  # forwards to the next
    assert allowed("node", "a", "write", t.client_result("alice"))  # answers clients
    assert allowed("node", "a", "write", t.node_status("a"))
    assert not allowed("node", "a", "write", t.node_status("b"))
    assert allowed("node", "a", "read", t.node_status("b"))
    assert allowed("node", "a", "read", t.session_free("m"))
    assert allowed("node", "a", "read", t.ack("a")) and not allowed("node", "a", "read", t.ack("b"))
    assert allowed("node", "a", "write", t.ack("alice"))
    assert not allowed("node", "a", "read", t.client_result("alice"))
    assert allowed("node", "a", "read", t.file_get("a"))  # serves its own files
    assert not allowed("node", "a", "read", t.file_get("b"))
    assert allowed("node", "a", "write", t.file_data("dev1.fetch"))
    assert not allowed("node", "a", "write", t.file_get("b"))  # only contributors fetch


def test_client_rights() -> None:
    t = T.Topics("jarvis")
    assert allowed("client", "alice", "write", t.node_layer("m", 0, "a"))
    assert allowed("client", "alice", "write", t.node_layer("m", 7, "a"))  # entering past a skip
    assert allowed("client", "alice", "write", t.session_free("m"))
    assert allowed("client", "alice", "read", t.node_status("a"))
    assert allowed("client", "alice", "read", t.client_result("alice"))
    assert not allowed("client", "alice", "read", t.client_result("bob"))
    assert not allowed("client", "alice", "write", t.client_result("bob"))
    assert not allowed("client", "alice", "write", t.node_status("a"))
    assert not allowed("client", "alice", "read", t.node_layer("m", 0, "a"))
    assert allowed("client", "alice", "read", t.ack("alice"))
    assert not allowed("client", "alice", "read", t.ack("a"))
    assert not allowed("client", "alice", "write", "other-root/m/m/layer/0/a")


def test_contributor_and_planner_rights() -> None:
    t = T.Topics("jarvis")
    agent = "dev1.smol.3"  # what a contributor names the agent hosting one span
    assert allowed("contributor", "dev1", "read", t.node_layer("m", 3, agent))
    assert allowed("contributor", "dev1", "write", t.node_status(agent))
    assert allowed("contributor", "dev1", "read", t.ack(agent))
    assert allowed("contributor", "dev1", "read", t.assign("dev1"))
    assert not allowed("contributor", "dev1", "read", t.assign("dev2"))
    assert not allowed("contributor", "dev1", "write", t.assign("dev1"))
    assert not allowed("contributor", "dev1", "read", t.client_result("alice"))
    assert allowed("contributor", "dev1", "write", t.file_get("dev2.smol.1"))
    assert allowed("contributor", "dev1", "read", t.file_data("dev1.fetch"))
    assert not allowed("client", "alice", "write", t.file_get("dev1.smol.1"))
    assert allowed("node", "a", "read", t.assign("a")) and not allowed(
        "node", "a", "read", t.assign("b")
    )
    assert allowed("planner", "p", "write", t.assign("dev1"))
    assert allowed("planner", "p", "read", t.node_status("dev1"))
    assert not allowed("planner", "p", "write", t.node_status("dev1"))
    assert not allowed("planner", "p", "write", t.node_layer("m", 0, "a"))


def test_monitor_reads_everything_and_writes_nothing() -> None:
    t = T.Topics("jarvis")
    for topic in (t.node_layer("m", 0, "a"), t.client_result("x"), "$SYS/broker/uptime"):
        assert allowed("monitor", "mon", "read", topic)
        assert not allowed("monitor", "mon", "write", topic)


def test_every_topic_has_a_writer_and_a_reader() -> None:
    # A topic kind added to topics.py without ACL rules would be refused on a deployed mesh.
    sample = {"model": "m", "layer": "2", "node_id": "a", "client_id": "a", "name": "a"}
    for spec in T.ALL_SPECS:
        topic = spec.pattern.format(root="jarvis", **sample)
        roles = [(r, "a") for r in ("node", "contributor", "client", "planner")]
        assert any(allowed(r, u, "write", topic) for r, u in roles), spec.pattern
        assert any(allowed(r, u, "read", topic) for r, u in roles), spec.pattern


def test_models_restrict_layer_topics() -> None:
    rules = security.acl_rules("client", "alice", "jarvis", models=["smol"])
    writable = [r.topic for r in rules if r.access == "write"]
    assert any(topic_matches_sub(f, "jarvis/m/smol/layer/0/a") for f in writable)
    assert not any(topic_matches_sub(f, "jarvis/m/big/layer/0/a") for f in writable)


def test_acl_file_names_each_user_once() -> None:
    text = security.render_acl(root="r/x", nodes=NODES, clients=CLIENTS, monitors=MONITORS)
    users = [line.split()[1] for line in text.splitlines() if line.startswith("user ")]
    assert users == [*NODES, *CLIENTS, *MONITORS]
    assert "topic read r/x/client/alice/result" in text
    first_user = text.index("\nuser ")
    assert "\ntopic " not in text[:first_user]  # nothing for anonymous clients


@pytest.mark.parametrize(
    "kw",
    [
        {"nodes": ["a"], "clients": ["a"]},  # one user, two roles
        {"nodes": ["a:b"]},  # the password file separator
        {"clients": ["has space"]},
        {"clients": ["x/y"]},
        {"monitors": ["#"]},
        {"nodes": ["a"], "models": ["m+"]},
    ],
)
def test_bad_acl_input_is_a_config_error(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        security.render_acl(**kw)


# -- passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["mosquitto_passwd", "hashlib"])
def test_password_hashes_verify(tool: str) -> None:
    found = security.find_mosquitto_passwd() if tool == "mosquitto_passwd" else None
    if tool == "mosquitto_passwd" and found is None:
        pytest.fail("mosquitto_passwd missing: `make setup` installs the mosquitto package")
    hashed = (
        security.hash_passwords({"u": "pw one"}, tool=found)
        if found
        else {"u": security._pbkdf2_hash("pw one")}
    )
    assert hashed["u"].startswith("$7$")
    assert security.verify_password(hashed["u"], "pw one")
    assert not security.verify_password(hashed["u"], "pw two")
    assert not security.verify_password("$7$garbage", "pw one")


def test_password_file_is_rewritten_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    assert security.write_password_file(path, {"a": "1", "b": "2"})
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not security.write_password_file(path, {"a": "1", "b": "2"})
    assert path.read_text() == first  # same salts: nothing to restart for
    assert security.write_password_file(path, {"a": "1", "b": "3"})
    after = security.parse_password_file(path.read_text())
    assert after["a"] == security.parse_password_file(first)["a"]  # untouched user kept
    assert security.verify_password(after["b"], "3")
    assert security.write_password_file(path, {"b": "3"})
    assert list(security.parse_password_file(path.read_text())) == ["b"]


def test_password_dir_generates_once(tmp_path: Path) -> None:
    got = security.load_passwords(tmp_path / "pw", ["n1", "n2"])
    assert len(got["n1"]) == 32 and got["n1"] != got["n2"]
    assert stat.S_IMODE((tmp_path / "pw" / "n1").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pw").stat().st_mode) == 0o700
    assert security.load_passwords(tmp_path / "pw", ["n1", "n2"]) == got
    with pytest.raises(ConfigError, match="no password"):
        security.load_passwords(tmp_path / "pw", ["n3"], create=False)


def test_cli_reports_changed_then_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw, acl, tls = tmp_path / "passwd", tmp_path / "acl", tmp_path / "tls"
    cmds = [
        ["auth", "passwd", "--out", str(pw), "--password-dir", str(tmp_path / "pw"),
         "--user", "node-a", "--user", "alice:secret"],
        ["auth", "acl", "--out", str(acl), "--root", "jarvis", "--node", "node-a",
         "--client", "alice"],
        ["auth", "ca", "--out", str(tls), "--host", "127.0.0.1", "--host", "broker.lan"],
    ]  # fmt: skip
    for cmd in cmds:
        assert ops_main(cmd) == 0
    first = capsys.readouterr().out.splitlines()
    assert first and all(line.startswith("changed: ") for line in first)
    for cmd in cmds:
        assert ops_main(cmd) == 0
    second = capsys.readouterr().out.splitlines()
    assert len(second) == len(first) and all(line.startswith("ok: ") for line in second)
    assert ops_main(["auth", "passwd", "--out", str(pw), "--user", "nopass"]) == 2


# -- certificates --------------------------------------------------------------------------------


def test_ca_keeps_what_is_right_and_reissues_for_new_hosts(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    written = security.ensure_ca(out, ["127.0.0.1", "Broker.lan"], ["alice"])
    assert set(written) >= {"ca.crt", "ca.key", "broker.crt", "broker.key", "alice.crt"}
    assert security.cert_sans(out / "broker.crt") == {"IP:127.0.0.1", "DNS:broker.lan"}
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert security.ensure_ca(out, ["broker.lan", "127.0.0.1"], ["alice"]) == []
    ca = (out / "ca.crt").read_bytes()
    assert security.ensure_ca(out, ["127.0.0.1", "10.0.0.2"], ["alice"]) == [
        "broker.key",
        "broker.crt",
    ]
    assert (out / "ca.crt").read_bytes() == ca  # the CA outlives its certificates
    with pytest.raises(ConfigError):
        security.san_entries(["bad host"])


# -- real brokers enforcing it -------------------------------------------------------------------


@dataclass
class Secured:
    """One broker with passwords and an ACL, and every user's password."""

    broker: MosquittoBroker
    root: str
    passwords: dict[str, str]
    tls_dir: Path | None = None

    @property
    def address(self) -> BrokerAddress:
        return self.broker.address

    def client(self, user: str | None, **kw: Any) -> MeshClient:
        kw.setdefault("connect_timeout", 5.0)
        kw.setdefault("backoff", (0.02, 0.2))
        # The MQTT client id is free; the username is what topics and the ACL name.
        cid = f"{user or 'anon'}-{os.getpid()}-{time.monotonic_ns()}"
        password = self.passwords.get(user or "")
        kw.setdefault("password", password)
        return MeshClient([self.address], client_id=cid, username=user, **kw)


def _secure_files(tmp_path: Path, root: str) -> tuple[BrokerSecurity, dict[str, str]]:
    users = [*NODES, *CLIENTS, *MONITORS]
    passwords = security.load_passwords(tmp_path / "pw", users)
    security.write_password_file(tmp_path / "passwd", passwords)
    acl = security.render_acl(root=root, nodes=NODES, clients=CLIENTS, monitors=MONITORS)
    security.write_acl_file(tmp_path / "acl", acl)
    return BrokerSecurity(password_file=tmp_path / "passwd", acl_file=tmp_path / "acl"), passwords


@pytest.fixture
def secured(tmp_path: Path, topic_root: str) -> Iterator[Secured]:
    """A broker that refuses anonymous clients and applies the mesh ACL under `topic_root`."""
    sec, passwords = _secure_files(tmp_path, topic_root)
    with MosquittoBroker(run_dir=tmp_path / "broker", security=sec, die_with_parent=True) as b:
        yield Secured(b, topic_root, passwords)


@pytest.fixture
def secured_tls(tmp_path: Path, topic_root: str) -> Iterator[Secured]:
    """The same broker speaking only TLS, with a certificate from a freshly made mesh CA."""
    sec, passwords = _secure_files(tmp_path, topic_root)
    tls = tmp_path / "tls"
    security.ensure_ca(tls, ["127.0.0.1"], ["alice"])
    sec = BrokerSecurity(
        password_file=sec.password_file,
        acl_file=sec.acl_file,
        tls_cert=tls / "broker.crt",
        tls_key=tls / "broker.key",
        tls_ca=tls / "ca.crt",
    )
    with MosquittoBroker(run_dir=tmp_path / "broker", security=sec, die_with_parent=True) as b:
        yield Secured(b, topic_root, passwords, tls)


async def next_message(client: MeshClient, within: float = 5.0) -> MeshMessage:
    """The next message delivered to `client`."""
    async with asyncio.timeout(within):
        async for m in client.messages():
            return m
    raise AssertionError("client closed")


async def only_sentinel(client: MeshClient, sentinel_topic: str) -> None:
    """Assert the next message is the sentinel: whatever was published before it never came.

    The sentinel is published after the forbidden message by the same client to the same broker,
    which delivers one publisher's messages in order: no sleep needed to prove an absence.
    """
    m = await next_message(client)
    assert m.topic == sentinel_topic, f"got {m.topic!r} {m.payload!r} before the sentinel"


@pytest.mark.integration
def test_anonymous_and_wrong_password_are_refused(secured: Secured) -> None:
    async def refused(user: str | None, password: str | None) -> None:
        # MeshClient retries until connect_timeout; the error names the broker's last answer.
        with pytest.raises(MeshError, match=r"[Nn]ot authori"):
            async with secured.client(user, password=password, connect_timeout=3.0):
                pass

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(refused(None, None), name="anonymous")
            tg.create_task(refused("alice", "wrong"), name="wrong password")
            tg.create_task(refused("mallory", "x"), name="unknown user")

    run(main())


@pytest.mark.integration
def test_client_cannot_read_another_clients_results(secured: Secured) -> None:
    t = T.Topics(secured.root)

    async def main() -> None:
        async with (
            secured.client("node-a") as node,
            secured.client("alice") as alice,
            secured.client("bob") as bob,
        ):
            await alice.subscribe(t.client_result("alice"))
            # Mosquitto grants the subscription and filters every delivery on it.
            await bob.subscribe(t.client_result("alice"))
            await bob.subscribe(f"{secured.root}/client/+/result")
            await bob.subscribe(t.client_result("bob"))
            await node.publish(t.client_result("alice"), b"for alice only")
            await node.publish(t.client_result("bob"), b"sentinel")
            m = await next_message(alice)
            assert (m.topic, m.payload) == (t.client_result("alice"), b"for alice only")
            await only_sentinel(bob, t.client_result("bob"))

    run(main())


@pytest.mark.integration
def test_client_cannot_impersonate_nodes_or_other_clients(secured: Secured) -> None:
    t = T.Topics(secured.root)

    async def main() -> None:
        async with (
            secured.client("mon") as mon,
            secured.client("node-a") as node,
            secured.client("alice") as alice,
        ):
            await mon.subscribe(f"{secured.root}/#")
            await node.subscribe(t.all_node_status())
            fake = T.pack_status(T.NodeStatus(node_id="node-b", model="m", start=0, end=30))
            # Acknowledged (MQTT 3.1.1 has no way to say no) and then dropped by the broker.
            assert await alice.publish(t.node_status("node-b"), fake, retain=True) == 1
            await alice.publish(t.client_result("bob"), b"forged result")
            await alice.publish(f"{secured.root}/node/node-b/other", b"outside the scheme")
            await alice.publish(t.session_free("m"), T.pack_session_free([T.SessionId("s1")]))
            await only_sentinel(mon, t.session_free("m"))
            # A node is not another node either.
            await node.publish(t.node_status("node-b"), fake, retain=True)
            await node.publish(t.node_status("node-a"), b"", retain=True)
            await only_sentinel(mon, t.node_status("node-a"))

    run(main())


@pytest.mark.integration
def test_node_cannot_read_layers_addressed_to_another_node(secured: Secured) -> None:
    t = T.Topics(secured.root)

    async def main() -> None:
        async with secured.client("node-a") as a, secured.client("alice") as alice:
            await a.subscribe(f"{secured.root}/m/m/layer/#")
            await alice.publish(t.node_layer("m", 0, "node-b"), b"for b")
            await alice.publish(t.node_layer("m", 0, "node-a"), b"for a")
            m = await next_message(a)
            assert (m.topic, m.payload) == (t.node_layer("m", 0, "node-a"), b"for a")

    run(main())


@pytest.mark.integration
def test_node_credentials_do_a_nodes_job(secured: Secured) -> None:
    """Status, will, layer in, layer out to the next node, result and ack back to the client."""
    t = T.Topics(secured.root)

    async def main() -> None:
        async with (
            secured.client("node-a") as a,
            secured.client("node-b") as b,
            secured.client("alice") as alice,
        ):
            await a.subscribe(t.node_layer("m", 0, "node-a"))
            await a.subscribe(t.session_free("m"))
            await b.subscribe(t.node_layer("m", 15, "node-b"))
            await b.subscribe(t.ack("node-b"))
            await alice.subscribe(t.client_result("alice"))
            await alice.subscribe(t.ack("alice"))
            await alice.subscribe(t.all_node_status())
            status = T.NodeStatus(node_id="node-a", model="m", start=0, end=15)
            await a.publish(t.node_status("node-a"), T.pack_status(status), retain=True)
            m = await next_message(alice)
            assert T.unpack_status(m.payload).node_id == "node-a" and m.retain is False

            await alice.publish(t.node_layer("m", 0, "node-a"), b"hidden 0")
            assert (await next_message(a)).payload == b"hidden 0"
            await a.publish(t.ack("alice"), b"ack from a")
            await a.publish(t.node_layer("m", 15, "node-b"), b"hidden 15")
            assert (await next_message(alice)).payload == b"ack from a"
            assert (await next_message(b)).payload == b"hidden 15"
            await b.publish(t.ack("node-a"), b"ack from b")  # a did not subscribe: just allowed
            await b.publish(t.client_result("alice"), b"result")
            assert (await next_message(alice)).payload == b"result"
            await alice.publish(t.session_free("m"), b"free")
            assert (await next_message(a)).payload == b"free"

    run(main())


@pytest.mark.integration
def test_model_list_in_the_acl_is_enforced(tmp_path: Path, topic_root: str) -> None:
    passwords = security.load_passwords(tmp_path / "pw", ["n", "c"])
    security.write_password_file(tmp_path / "passwd", passwords)
    acl = security.render_acl(root=topic_root, nodes=["n"], clients=["c"], models=["smol"])
    security.write_acl_file(tmp_path / "acl", acl)
    sec = BrokerSecurity(password_file=tmp_path / "passwd", acl_file=tmp_path / "acl")
    t = T.Topics(topic_root)

    async def main(broker: MosquittoBroker) -> None:
        s = Secured(broker, topic_root, passwords)
        async with s.client("n") as n, s.client("c") as c:
            await n.subscribe(f"{topic_root}/m/+/layer/+/n")
            await c.publish(t.node_layer("big", 0, "n"), b"other model")
            await c.publish(t.node_layer("smol", 0, "n"), b"sentinel")
            await only_sentinel(n, t.node_layer("smol", 0, "n"))

    with MosquittoBroker(run_dir=tmp_path / "b", security=sec, die_with_parent=True) as broker:
        run(main(broker))


@pytest.mark.integration
def test_hashlib_hashes_and_reload_take_effect(tmp_path: Path, topic_root: str) -> None:
    """A hash made without mosquitto_passwd is accepted; SIGHUP picks up a new user."""
    path = tmp_path / "passwd"
    path.write_text(f"old:{security._pbkdf2_hash('pw-old')}\n")
    sec = BrokerSecurity(password_file=path)

    async def connects(broker: MosquittoBroker, user: str, password: str) -> bool:
        try:
            async with MeshClient(
                [broker.address], client_id=user, username=user, password=password,
                connect_timeout=2.0, backoff=(0.02, 0.1),
            ):  # fmt: skip
                return True
        except MeshError:
            return False

    with MosquittoBroker(run_dir=tmp_path / "b", security=sec, die_with_parent=True) as broker:
        assert run(connects(broker, "old", "pw-old"))
        assert not run(connects(broker, "new", "pw-new"))
        security.write_password_file(path, {"old": "pw-old", "new": "pw-new"})
        broker.reload()
        assert run(connects(broker, "new", "pw-new"))  # retried until the broker re-read it


# -- TLS -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tls_mesh_client_exchanges_messages(secured_tls: Secured) -> None:
    s, t = secured_tls, T.Topics(secured_tls.root)
    assert s.tls_dir is not None
    ca = s.tls_dir / "ca.crt"

    async def main() -> None:
        async with s.client("node-a", tls_ca=ca) as node, s.client("alice", tls_ca=ca) as alice:
            await alice.subscribe(t.client_result("alice"))
            await node.publish(t.client_result("alice"), b"over tls")
            m = await next_message(alice)
            assert m.payload == b"over tls" and node.tcp_nodelay() == {s.address: True}

    run(main())


@pytest.mark.integration
def test_tls_without_the_mesh_ca_fails(secured_tls: Secured, tmp_path: Path) -> None:
    s = secured_tls
    assert s.tls_dir is not None
    other = tmp_path / "other-ca"
    security.ensure_ca(other, ["127.0.0.1"])

    wrong_name = BrokerAddress("localhost", s.address.port)
    ca, pw = s.tls_dir / "ca.crt", s.passwords["alice"]

    async def refused(match: str, *, address: BrokerAddress = s.address, **kw: Any) -> None:
        with pytest.raises(MeshError, match=match):
            async with MeshClient(
                [address], client_id=f"x-{time.monotonic_ns()}", username="alice", password=pw,
                connect_timeout=3.0, **kw,
            ):  # fmt: skip
                pass

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(refused("no broker reachable"), name="plain MQTT to a TLS port")
            tg.create_task(
                refused("CERTIFICATE_VERIFY_FAILED", tls_ca=other / "ca.crt"), name="other CA"
            )
            # The certificate names 127.0.0.1 only: another name for the same broker is refused...
            tg.create_task(
                refused("CERTIFICATE_VERIFY_FAILED", address=wrong_name, tls_ca=ca),
                name="wrong host name",
            )
        # ...unless the host name check is waived on purpose.
        async with MeshClient(
            [wrong_name], client_id="y", username="alice", password=pw, tls_ca=ca,
            tls_insecure=True, connect_timeout=5.0,
        ):  # fmt: skip
            pass

    run(main())


@pytest.mark.integration
def test_tls_client_certificate_when_required(tmp_path: Path, topic_root: str) -> None:
    sec, passwords = _secure_files(tmp_path, topic_root)
    tls = tmp_path / "tls"
    security.ensure_ca(tls, ["127.0.0.1"], ["alice"])
    sec = BrokerSecurity(
        password_file=sec.password_file,
        acl_file=sec.acl_file,
        tls_cert=tls / "broker.crt",
        tls_key=tls / "broker.key",
        tls_ca=tls / "ca.crt",
        require_client_cert=True,
    )

    async def main(s: Secured) -> None:
        with pytest.raises(MeshError, match="no broker reachable"):
            async with s.client("alice", tls_ca=tls / "ca.crt", connect_timeout=2.0):
                pass
        async with s.client(
            "alice", tls_ca=tls / "ca.crt", tls_cert=tls / "alice.crt", tls_key=tls / "alice.key"
        ) as c:
            assert c.connected_brokers() == [s.address]

    with MosquittoBroker(run_dir=tmp_path / "b", security=sec, die_with_parent=True) as broker:
        run(main(Secured(broker, topic_root, passwords, tls)))


# -- settings and shutdown -----------------------------------------------------------------------


def test_close_outlasts_a_swallowed_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11's wait_for (in aiomqtt's connect) can swallow a cancel: close cancels again."""

    async def stubborn_run(link: transport._Link) -> None:
        link.mesh._any_up.set()  # as if connected
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)  # serving on as if never cancelled

    monkeypatch.setattr(transport._Link, "run", stubborn_run)
    monkeypatch.setattr(transport, "_RECANCEL_AFTER", 0.05)

    async def main() -> None:
        async with MeshClient([BrokerAddress("127.0.0.1", 1)], client_id="x"):
            pass

    run(main(), timeout=5)


def test_auth_comes_from_the_environment_when_not_given(tmp_path: Path) -> None:
    env = {"JARVIS_MQTT_USERNAME": "n1", "JARVIS_MQTT_PASSWORD": "pw"}
    auth = MeshAuth.resolve(env=env)
    assert (auth.username, auth.password, auth.tls_ca) == ("n1", "pw", None)
    assert "pw" not in repr(auth)
    assert MeshAuth.resolve(username="x", env=env).username == "x"
    assert MeshAuth.resolve(env={}).ssl_context() is None
    with pytest.raises(ConfigError, match="needs a username"):
        MeshAuth.resolve(env={"JARVIS_MQTT_PASSWORD": "pw"})
    with pytest.raises(ConfigError, match="cannot load TLS"):
        MeshAuth.resolve(tls_ca=tmp_path / "missing.crt", env={}).ssl_context()


def test_broker_config_sections() -> None:
    plain = render_config(port=1, log_file=None)
    assert "allow_anonymous true" in plain and "password_file" not in plain
    sec = BrokerSecurity(
        password_file=Path("/p"), acl_file=Path("/a"), tls_cert=Path("/c"), tls_key=Path("/k")
    )
    text = render_config(port=8883, log_file=None, security=sec)
    for line in ("allow_anonymous false", "password_file /p", "acl_file /a", "certfile /c"):
        assert f"\n{line}\n" in text
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "$" in line]  # every placeholder filled
    with pytest.raises(ConfigError):
        BrokerSecurity(acl_file=Path("/a"))
    with pytest.raises(ConfigError):
        BrokerSecurity(tls_cert=Path("/c"))
    with pytest.raises(ConfigError):
        render_config(port=1, log_file=None, security=BrokerSecurity(password_file=Path("/p\nx")))
