"""`jarvis auth ...` and `jarvis wait-nodes`: credentials for a deployed mesh, and its check.

Each writer prints `changed: FILE` or `ok: FILE` per file, so the Ansible roles can report
changes honestly. Also runnable as `python -m jarvis_mqtt.cli_ops` (what the roles call).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jarvis_mqtt import security
from jarvis_mqtt.errors import ConfigError, JarvisError

log = logging.getLogger("jarvis.ops")


def _report(path: Path, changed: bool) -> None:
    print(f"{'changed' if changed else 'ok'}: {path}")


def cmd_passwd(a: argparse.Namespace) -> int:
    """Write the Mosquitto password file for `--user NAME[:PASS]`."""
    given: dict[str, str] = {}
    from_dir: list[str] = []
    for spec in a.user:
        name, sep, password = spec.partition(":")
        security.check_username(name)
        if name in given or name in from_dir:
            raise ConfigError(f"user {name!r} given twice")
        if sep:
            given[name] = password
        else:
            from_dir.append(name)
    if from_dir and a.password_dir is None:
        raise ConfigError(
            f"no password for {', '.join(from_dir)}: give NAME:PASS or --password-dir"
        )
    if from_dir:
        given |= security.load_passwords(Path(a.password_dir), from_dir, create=not a.no_create)
    passwords = {name: given[name] for name in [s.partition(":")[0] for s in a.user]}
    _report(Path(a.out), security.write_password_file(Path(a.out), passwords))
    return 0


def cmd_acl(a: argparse.Namespace) -> int:
    """Write the Mosquitto ACL giving nodes, clients and monitors their rights."""
    text = security.render_acl(
        root=a.root,
        nodes=a.node,
        contributors=a.contributor,
        clients=a.client,
        planners=a.planner,
        monitors=a.monitor,
        models=a.model,
    )
    _report(Path(a.out), security.write_acl_file(Path(a.out), text))
    return 0


def cmd_ca(a: argparse.Namespace) -> int:
    """Make (or keep) the mesh CA, a broker certificate and client certificates."""
    out = Path(a.out)
    written = security.ensure_ca(
        out, a.host, a.client, name=a.name, ca_days=a.ca_days, cert_days=a.days
    )
    names = [security.CA_CERT, f"{a.name}.crt", *(f"{c}.crt" for c in a.client)]
    for name in names:
        _report(out / name, name in written)
    return 0


def cmd_wait_nodes(a: argparse.Namespace) -> int:
    """Wait until every `--node-id` has a retained online status on the mesh."""
    from jarvis_mqtt.brokers import parse_brokers
    from jarvis_mqtt.client import wait_for_nodes

    # Credentials come from $JARVIS_MQTT_USERNAME/PASSWORD/TLS_CA (see mesh_auth.MeshAuth).
    asyncio.run(wait_for_nodes(parse_brokers(a.broker), a.topic_root, a.node_id, a.timeout))
    print(f"online: {', '.join(a.node_id)}")
    return 0


def register(subparsers: Any) -> None:
    """Add `auth` and `wait-nodes` to the `jarvis` subcommands."""
    auth = subparsers.add_parser("auth", help="password file, ACL and TLS CA for the brokers")
    asub = auth.add_subparsers(dest="auth_cmd", required=True)

    p = asub.add_parser("passwd", help="Mosquitto password file (kept when nothing changed)")
    p.add_argument("--out", required=True, help="password file to write")
    p.add_argument(
        "--user",
        action="append",
        required=True,
        metavar="NAME[:PASS]",
        help="a user (repeatable); without :PASS the password is --password-dir/NAME",
    )
    p.add_argument(
        "--password-dir",
        help="one file per user holding its password; missing ones are generated (mode 0600)",
    )
    p.add_argument("--no-create", action="store_true", help="fail on a missing password file")
    p.set_defaults(func=cmd_passwd)

    p = asub.add_parser("acl", help="Mosquitto ACL for nodes, clients and monitors")
    p.add_argument("--out", required=True, help="ACL file to write")
    p.add_argument("--root", default="jarvis", help="topic root of the mesh")
    p.add_argument("--node", action="append", default=[], metavar="NAME", help="a node user")
    p.add_argument(
        "--contributor",
        action="append",
        default=[],
        metavar="NAME",
        help="a `jarvis node --contribute` user: node rights for any node id",
    )
    p.add_argument("--client", action="append", default=[], metavar="NAME", help="a client user")
    p.add_argument(
        "--planner", action="append", default=[], metavar="NAME", help="writes assignments"
    )
    p.add_argument(
        "--monitor", action="append", default=[], metavar="NAME", help="a read-only user"
    )
    p.add_argument("--model", action="append", default=[], help="only these models (default: any)")
    p.set_defaults(func=cmd_acl)

    p = asub.add_parser("ca", help="mesh CA, broker certificate and client certificates")
    p.add_argument("--out", required=True, help="directory (mode 0700) for keys and certificates")
    p.add_argument("--name", default="broker", help="file name of the broker certificate")
    p.add_argument(
        "--host",
        action="append",
        required=True,
        help="a name or address clients use for a broker (repeatable)",
    )
    p.add_argument("--client", action="append", default=[], metavar="NAME", help="client cert")
    p.add_argument("--days", type=int, default=security.CERT_DAYS, help="certificate lifetime")
    p.add_argument("--ca-days", type=int, default=security.CA_DAYS, help="CA lifetime")
    p.set_defaults(func=cmd_ca)

    w = subparsers.add_parser("wait-nodes", help="wait for nodes' online status on the mesh")
    w.add_argument("--broker", required=True, help="HOST:PORT[,HOST:PORT...] of every broker")
    w.add_argument("--topic-root", default="jarvis")
    w.add_argument("--node-id", action="append", required=True, help="repeatable")
    w.add_argument("--timeout", type=float, default=60.0, help="seconds")
    w.set_defaults(func=cmd_wait_nodes)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jarvis_mqtt.cli_ops ...`: these commands without the rest of `jarvis`."""
    p = argparse.ArgumentParser(prog="jarvis", description=__doc__)
    register(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        return int(a.func(a) or 0)
    except JarvisError as e:
        print(f"jarvis: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
