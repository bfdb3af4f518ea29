"""Credentials of a deployed mesh: the brokers' password file and ACL, and a CA for TLS.

Every node and client has its own MQTT user whose name is also its id in topics (a node's
`node_id`, a client's `client_id`), so the ACL can say "only your own status, only your own
results". Five roles:

| role        | reads                                              | writes                      |
| ----------- | -------------------------------------------------- | --------------------------- |
| node        | layer topics addressed to it (or to no node),      | any layer topic, its own    |
|             | `free`, every status, its acks and assignment,     | status, any result, any ack,|
|             | requests for its files                             | pieces of its files         |
| contributor | as a node, for any node id; pieces of files        | as a node, for any node id; |
|             |                                                    | requests for files          |
| client      | every status, its own result and acks              | any layer topic, `free`     |
| planner     | every status and assignment                        | any assignment              |
| monitor     | everything under the root, and `$SYS`              | nothing                     |

A contributor (`jarvis node --contribute`) names the agents it hosts `{user}.{model}.{n}`: one
topic level no ACL pattern can tie to the user, so it is trusted with every node id.

Hashing is Mosquitto's own `mosquitto_passwd` when installed (PBKDF2-SHA512, the `$7$` format),
else the same format from `hashlib`; certificates come from the `openssl` command. Every writer
here is idempotent: a file is rewritten only when what it says changes, so Ansible can tell
"changed" from "ok".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jarvis_mqtt import topics as T
from jarvis_mqtt.errors import ConfigError

ROLES = ("node", "contributor", "client", "planner", "monitor")
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 uses; passwords here are 32 random chars
CA_DAYS = 3650  # lifetime of the mesh CA
CERT_DAYS = 825  # lifetime of broker and client certificates
RENEW_BEFORE = 30 * 86400  # seconds: a certificate expiring sooner is issued again
_DNS_NAME = re.compile(r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}")


# -- users and the ACL ---------------------------------------------------------------------------


def check_username(name: str) -> str:
    """`name` if it can be an MQTT user here (it is also a topic level), else ConfigError."""
    T.check_name(name, "user name")
    if ":" in name:
        raise ConfigError(f"bad user name {name!r}: ':' separates it from the password hash")
    return name


@dataclass(frozen=True)
class AclRule:
    """One line of a Mosquitto ACL: `topic read|write FILTER`."""

    access: str  # "read" or "write"
    topic: str  # a filter: `+` and `#` allowed

    def line(self) -> str:
        """The rule as Mosquitto reads it."""
        return f"topic {self.access} {self.topic}"


def _topic(spec: T.TopicSpec, root: str, **parts: str) -> str:
    # Filled from the declared pattern, so a renamed topic cannot drift from its ACL.
    return spec.pattern.format(root=root, **parts)


def acl_rules(
    role: str, user: str, root: str = T.DEFAULT_ROOT, models: Sequence[str] = ()
) -> list[AclRule]:
    """What `user` in `role` may read and write under `root` (models: () means any model)."""
    check_username(user)
    T.Topics(root)  # validates every level of the root
    names = [T.check_name(m, "model name") for m in models] or ["+"]
    r, w = "read", "write"
    if role in ("node", "contributor"):
        # A contributor hosts agents named `{user}.{model}.{n}`: one topic level that no ACL
        # pattern can tie to `user`, so it acts for any node id (and is trusted as much).
        me = user if role == "node" else "+"
        per_model = [
            rule
            for m in names
            for rule in (
                AclRule(r, _topic(T.NODE_LAYER, root, model=m, layer="+", node_id=me)),
                # Addressed to no node in particular: whoever hosts the layer.
                AclRule(r, _topic(T.LAYER, root, model=m, layer="+")),
                # It forwards to whichever node hosts the next live layer.
                AclRule(w, _topic(T.LAYER, root, model=m, layer="#")),
                AclRule(r, _topic(T.SESSION_FREE, root, model=m)),
            )
        ]
        return [
            *per_model,
            AclRule(r, _topic(T.NODE_STATUS, root, node_id="+")),
            AclRule(w, _topic(T.NODE_STATUS, root, node_id=me)),
            AclRule(r, _topic(T.ASSIGN, root, node_id=user)),
            AclRule(w, _topic(T.CLIENT_RESULT, root, client_id="+")),
            AclRule(r, _topic(T.ACK, root, name=me)),
            AclRule(w, _topic(T.ACK, root, name="+")),
            # Any node serves the files of its model; only a contributor fetches them.
            AclRule(r, _topic(T.FILE_GET, root, node_id=me)),
            AclRule(w, _topic(T.FILE_DATA, root, name="+")),
            *(
                [
                    AclRule(w, _topic(T.FILE_GET, root, node_id="+")),
                    AclRule(r, _topic(T.FILE_DATA, root, name="+")),
                ]
                if role == "contributor"
                else []
            ),
        ]
    if role == "client":
        per_model = [
            rule
            for m in names
            for rule in (
                # Layer 0 normally; a later layer when the first ones are skipped.
                AclRule(w, _topic(T.LAYER, root, model=m, layer="#")),
                AclRule(w, _topic(T.SESSION_FREE, root, model=m)),
            )
        ]
        return [
            *per_model,
            AclRule(r, _topic(T.NODE_STATUS, root, node_id="+")),
            AclRule(r, _topic(T.CLIENT_RESULT, root, client_id=user)),
            AclRule(r, _topic(T.ACK, root, name=user)),
        ]
    if role == "planner":  # `jarvis plan --apply`: reads the offers, writes the assignments
        return [
            AclRule(r, _topic(T.NODE_STATUS, root, node_id="+")),
            AclRule(r, _topic(T.ASSIGN, root, node_id="+")),
            AclRule(w, _topic(T.ASSIGN, root, node_id="+")),
        ]
    if role == "monitor":
        return [AclRule(r, f"{root}/#"), AclRule(r, "$SYS/#")]
    raise ConfigError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def render_acl(
    *,
    root: str = T.DEFAULT_ROOT,
    nodes: Iterable[str] = (),
    clients: Iterable[str] = (),
    monitors: Iterable[str] = (),
    contributors: Iterable[str] = (),
    planners: Iterable[str] = (),
    models: Sequence[str] = (),
) -> str:
    """A Mosquitto ACL file giving each user the rights of its role; ConfigError on a clash."""
    roles: dict[str, str] = {}
    by_role = (
        ("node", nodes),
        ("contributor", contributors),
        ("client", clients),
        ("planner", planners),
        ("monitor", monitors),
    )
    for role, users in by_role:
        for user in users:
            if roles.setdefault(check_username(user), role) != role:
                raise ConfigError(f"user {user!r} is both a {roles[user]} and a {role}")
    lines = [
        "# Mosquitto ACL of a JARVIS mesh, written by `jarvis auth acl`: edit its flags, not this.",
        f"# Topic root {root!r}; models: {', '.join(models) or 'any'}.",
        "# No rule comes before the first `user` line: anonymous clients may do nothing.",
    ]
    for user, role in roles.items():
        lines += ["", f"# {role}", f"user {user}"]
        lines += [rule.line() for rule in acl_rules(role, user, root, models)]
    return "\n".join(lines) + "\n"


# -- passwords -----------------------------------------------------------------------------------


def new_password() -> str:
    """32 random letters and digits (what the Ansible roles generate too)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(32))


def _check_password(user: str, password: str) -> str:
    if not password or any(c in password for c in "\r\n\0"):
        raise ConfigError(f"bad password for {user!r}: empty, or a line break or NUL in it")
    return password


def load_passwords(
    password_dir: Path, users: Iterable[str], *, create: bool = True
) -> dict[str, str]:
    """Each user's password from `password_dir/USER`, made (mode 0600) when missing and `create`."""
    password_dir = Path(password_dir)
    out: dict[str, str] = {}
    for user in users:
        path = password_dir / check_username(user)
        try:
            out[user] = _check_password(user, path.read_text().splitlines()[0].strip())
            continue
        except FileNotFoundError:
            if not create:
                raise ConfigError(f"no password for {user!r} in {password_dir}") from None
        except (OSError, IndexError) as e:
            raise ConfigError(f"unreadable password for {user!r} in {path}: {e}") from e
        password_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        out[user] = new_password()
        _write_private(path, out[user] + "\n")
    return out


def verify_password(hashed: str, password: str) -> bool:
    """Whether `password` matches a Mosquitto hash (`$7$` PBKDF2-SHA512, or the older `$6$`)."""
    try:
        parts = hashed.split("$")
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, want = int(parts[2]), _b64(parts[3]), _b64(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want))
        elif len(parts) == 4 and parts[1] == "6":
            salt, want = _b64(parts[2]), _b64(parts[3])
            got = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except ValueError:  # a damaged line is simply not a match: it gets hashed again
        return False
    return hmac.compare_digest(got, want)


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def find_mosquitto_passwd() -> str | None:
    """Path of `mosquitto_passwd` (Debian: package mosquitto), or None."""
    return shutil.which("mosquitto_passwd") or shutil.which(
        "mosquitto_passwd", path="/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin"
    )


def hash_passwords(passwords: Mapping[str, str], *, tool: str | None = None) -> dict[str, str]:
    """`$7$` hashes of these passwords: by `mosquitto_passwd` when found, else by hashlib."""
    for user, password in passwords.items():
        _check_password(check_username(user), password)
    if not passwords:
        return {}
    tool = tool or find_mosquitto_passwd()
    if tool is None:
        return {u: _pbkdf2_hash(p) for u, p in passwords.items()}
    # `-U` hashes a plaintext file in place: passwords never appear on a command line.
    with tempfile.TemporaryDirectory(prefix="jarvis-passwd-") as tmp:
        path = Path(tmp) / "passwd"
        _write_private(path, "".join(f"{u}:{p}\n" for u, p in passwords.items()))
        _run([tool, "-U", str(path)], "mosquitto_passwd")
        hashed = parse_password_file(path.read_text())
    if set(hashed) != set(passwords):
        raise ConfigError(f"mosquitto_passwd returned users {sorted(hashed)}")
    return hashed


def _pbkdf2_hash(password: str) -> str:
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def parse_password_file(text: str) -> dict[str, str]:
    """user -> hash from a Mosquitto password file."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        user, sep, hashed = line.strip().partition(":")
        if sep and user and not user.startswith("#"):
            out[user] = hashed
    return out


def write_password_file(
    path: Path, passwords: Mapping[str, str], *, tool: str | None = None
) -> bool:
    """Make `path` hold exactly these users; True if it changed.

    A user whose current hash still matches keeps it, so re-running with the same passwords
    leaves the file untouched (Mosquitto 2 salts every hash: a fresh one always differs).
    """
    path = Path(path)
    try:
        old = parse_password_file(path.read_text())
    except FileNotFoundError:
        old = {}
    except OSError as e:
        raise ConfigError(f"cannot read password file {path}: {e}") from e
    keep = {u: h for u, h in old.items() if u in passwords and verify_password(h, passwords[u])}
    fresh = hash_passwords({u: p for u, p in passwords.items() if u not in keep}, tool=tool)
    text = "".join(f"{u}:{keep.get(u) or fresh[u]}\n" for u in passwords)
    return _write_private(path, text)


# -- files ---------------------------------------------------------------------------------------


def _write_private(path: Path, text: str, mode: int = 0o600) -> bool:
    """Atomically write `text` with `mode` unless the file already holds it; True if written."""
    path = Path(path)
    try:
        if path.read_text() == text:
            if path.stat().st_mode & 0o777 != mode:
                path.chmod(mode)
            return False
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def write_acl_file(path: Path, text: str) -> bool:
    """Write an ACL (mode 0644: it names users but holds no secret); True if it changed."""
    return _write_private(Path(path), text, mode=0o644)


def _run(
    cmd: Sequence[str], what: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ConfigError(f"cannot run {what}: {e}") from e
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise ConfigError(f"{what} failed ({proc.returncode}): {err[-1] if err else ''}")
    return proc


# -- TLS -----------------------------------------------------------------------------------------

CA_CERT, CA_KEY = "ca.crt", "ca.key"

_OPENSSL_CONF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = {san}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def san_entries(hosts: Iterable[str]) -> frozenset[str]:
    """`IP:...`/`DNS:...` names for a certificate valid for these hosts; ConfigError if bad."""
    out = set()
    for host in hosts:
        host = host.strip().strip("[]")
        try:
            out.add(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise ConfigError(f"bad host name for a certificate: {host!r}") from None
            out.add(f"DNS:{host.lower()}")
    if not out:
        raise ConfigError("a broker certificate needs at least one --host")
    return frozenset(out)


def _openssl(args: Sequence[str], cwd: Path) -> str:
    tool = shutil.which("openssl")
    if tool is None:
        raise ConfigError("openssl not found: install it (apt-get install openssl)")
    return _run([tool, *args], "openssl " + args[0], cwd=cwd).stdout


def _ok(args: Sequence[str], cwd: Path) -> bool:
    try:
        _openssl(args, cwd)
        return True
    except ConfigError:
        return False


def cert_sans(cert: Path) -> frozenset[str]:
    """The subjectAltName entries of a certificate, as `IP:...`/`DNS:...`."""
    cert = Path(cert).resolve()
    text = _openssl(["x509", "-in", cert.name, "-noout", "-ext", "subjectAltName"], cert.parent)
    out = set()
    for line in text.splitlines()[1:]:
        for item in line.split(","):
            kind, _, value = item.strip().partition(":")
            if kind == "IP Address":
                out.add(f"IP:{ipaddress.ip_address(value)}")
            elif kind == "DNS":
                out.add(f"DNS:{value.lower()}")
    return frozenset(out)


def _cert_valid(name: str, out: Path, sans: frozenset[str] | None = None) -> bool:
    """Signed by our CA, far from expiry, and (for the broker) for exactly these hosts."""
    crt = out / f"{name}.crt"
    if not (crt.is_file() and (out / f"{name}.key").is_file()):
        return False
    if not _ok(["verify", "-CAfile", CA_CERT, crt.name], out):
        return False
    if not _ok(["x509", "-in", crt.name, "-noout", "-checkend", str(RENEW_BEFORE)], out):
        return False
    return sans is None or cert_sans(crt) == sans


def _issue(name: str, out: Path, conf: Path, ext: str, days: int) -> None:
    """A fresh key and a certificate for it signed by the CA in `out`."""
    csr = out / f"{name}.csr"
    try:
        _openssl(
            ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", csr.name, "-subj", f"/CN={name}",
             "-config", str(conf)],
            out,
        )  # fmt: skip
        _openssl(
            ["x509", "-req", "-in", csr.name, "-CA", CA_CERT, "-CAkey", CA_KEY,
             "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(days),
             "-extfile", str(conf), "-extensions", ext, "-out", f"{name}.crt"],
            out,
        )  # fmt: skip
    finally:
        csr.unlink(missing_ok=True)
    (out / f"{name}.key").chmod(0o600)
    (out / f"{name}.crt").chmod(0o644)


def ensure_ca(
    out: Path,
    hosts: Sequence[str],
    clients: Sequence[str] = (),
    *,
    name: str = "broker",
    ca_days: int = CA_DAYS,
    cert_days: int = CERT_DAYS,
) -> list[str]:
    """Make `out` hold a mesh CA, a broker certificate `name` for `hosts`, client certificates.

    What exists and is still right is kept (the CA always is); returns the files written.
    One CA serves every broker: call again with another `name` for each broker's own
    certificate. `ca.key` never needs to leave the machine that runs this.
    """
    out = Path(out).resolve()
    sans = san_entries(hosts)
    for cert in (name, *clients):
        check_username(cert)
    if "ca" in (name, *clients) or name in clients:
        raise ConfigError(f"certificate names must differ from each other and from 'ca': {name}")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.chmod(0o700)  # keys are written here before their mode is narrowed
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="jarvis-openssl-") as tmp:
        conf = Path(tmp) / "openssl.cnf"
        conf.write_text(_OPENSSL_CONF.format(san=", ".join(sorted(sans))))
        if not ((out / CA_CERT).is_file() and (out / CA_KEY).is_file()):
            _openssl(
                ["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", CA_KEY, "-out", CA_CERT, "-days", str(ca_days),
                 "-subj", "/CN=JARVIS mesh CA", "-config", str(conf), "-extensions", "ca"],
                out,
            )  # fmt: skip
            (out / CA_KEY).chmod(0o600)
            (out / CA_CERT).chmod(0o644)
            written += [CA_KEY, CA_CERT]
        if not _cert_valid(name, out, sans):
            _issue(name, out, conf, "server", cert_days)
            written += [f"{name}.key", f"{name}.crt"]
        for client in clients:
            if not _cert_valid(client, out):
                _issue(client, out, conf, "client", cert_days)
                written += [f"{client}.key", f"{client}.crt"]
    return written
