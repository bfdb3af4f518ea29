"""deploy/ansible: lint, syntax, and a real deployment of a mesh on this machine.

The deployment test plays every "host" locally (`ansible_connection=local`), told apart by
ports and directories under a temp dir: two brokers and three nodes, passwords, ACL and TLS
on, no systemd (`process` service manager). It then generates through the deployed mesh and
plays again, expecting nothing to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import grp
import itertools
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import psutil
import pytest
import yaml

from jarvis_mqtt.brokers import BrokerAddress, BrokerSecurity, free_port, render_config
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.client import RemoteModel
from jarvis_mqtt.generate import LocalModel
from jarvis_mqtt.mesh import stop_pid
from jarvis_mqtt.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent
SPANS = ("0:9", "9:21", "21:30")  # uneven on purpose
PROMPT = "What is the capital of France?"
NEW_TOKENS = 8


def ansible_env(tmp_path: Path) -> dict[str, str]:
    """Environment for ansible commands: this venv first, state under the test's temp dir."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    for key in [k for k in env if k.startswith("JARVIS_MQTT_")]:
        del env[key]  # the nodes must get their credentials from the role, not from us
    return env


def run_ansible(cmd: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run an ansible tool from the playbook directory; its output goes to the test log."""
    log = tmp_path / f"{cmd[0]}-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / cmd[0]), *cmd[1:]],
            cwd=ANSIBLE,
            env=ansible_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Its workers and their module processes first, by pid. (The services it started
            # were detached by start-stop-daemon; `deploy_dir` stops them by their pid files.)
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.kill()
            proc.wait()
        finally:
            print(log.read_text()[-20000:])  # shown by pytest when the test fails
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    proc = run_ansible(["ansible-lint", "--offline", "--nocolor"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_playbook_syntax(tmp_path: Path) -> None:
    proc = run_ansible(
        ["ansible-playbook", "--syntax-check", "-i", "inventory/pis.yml", "site.yml"],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_inventory_splits_the_model_without_gaps() -> None:
    inv = yaml.safe_load((ANSIBLE / "inventory" / "pis.yml").read_text())
    groups = inv["all"]["children"]
    assert len(groups["jarvis_brokers"]["hosts"]) >= 2
    spans = sorted(
        tuple(int(x) for x in h["jarvis_node_layers"].split(":"))
        for h in groups["jarvis_nodes"]["hosts"].values()
    )
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def _directives(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_role_and_local_broker_configs_agree() -> None:
    """The role's mosquitto.conf says what broker/mosquitto.conf.tmpl says, setting for setting."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["bool"] = lambda v: str(v).lower() in ("1", "true", "yes", "on")
    role = ANSIBLE / "roles" / "jarvis_broker"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    conf_dir = "/etc/jarvis-broker"
    for tls in (False, True):
        text = env.from_string((role / "templates" / "mosquitto.conf.j2").read_text()).render(
            jarvis_broker_user="mosquitto",
            jarvis_broker_port=8883,
            jarvis_broker_bind="0.0.0.0",
            jarvis_broker_tls=tls,
            jarvis_broker_tls_require_client_cert=False,
            jarvis_broker_config_dir=conf_dir,
            jarvis_broker_max_packet_size=defaults["jarvis_broker_max_packet_size"],
            jarvis_broker_max_queued_messages=defaults["jarvis_broker_max_queued_messages"],
            jarvis_broker_log_dest="stdout",
        )
        certs = {
            "tls_cert": Path(f"{conf_dir}/broker.crt"),
            "tls_key": Path(f"{conf_dir}/broker.key"),
            "tls_ca": Path(f"{conf_dir}/ca.crt"),
        }
        local = render_config(
            port=8883,
            log_file=None,
            user="mosquitto",
            security=BrokerSecurity(
                password_file=Path(f"{conf_dir}/mosquitto.passwd"),
                acl_file=Path(f"{conf_dir}/mosquitto.acl"),
                **(certs if tls else {}),  # type: ignore[arg-type]
            ),
        )
        assert _directives(text) == _directives(local)


# -- a real deployment ---------------------------------------------------------------------------


def _inventory(tmp_path: Path, md: ModelDir, root: str, ports: list[int]) -> dict[str, Any]:
    user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    secrets = str(tmp_path / "secrets")
    brokers = {
        f"broker-{i}": {
            "jarvis_broker_port": port,
            "jarvis_broker_bind": "127.0.0.1",
            "jarvis_broker_address": "127.0.0.1",
            "jarvis_broker_config_dir": str(tmp_path / f"broker-{i}" / "etc"),
            "jarvis_broker_state_dir": str(tmp_path / f"broker-{i}" / "var"),
            "jarvis_broker_service_name": f"jarvis-broker-{i}",
        }
        for i, port in enumerate(ports)
    }
    nodes = {
        f"node-{i}": {"jarvis_node_layers": span, "jarvis_node_home": str(tmp_path / f"node-{i}")}
        for i, span in enumerate(SPANS)
    }
    return {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "jarvis_become": False,
            },
            "children": {
                "jarvis_brokers": {
                    "vars": {
                        "jarvis_broker_topic_root": root,
                        "jarvis_broker_tls": True,
                        "jarvis_broker_clients": ["chat"],
                        "jarvis_broker_secrets_dir": secrets,
                        "jarvis_broker_controller_python": sys.executable,
                        # Already installed by `make setup`; apt is not for a test.
                        "jarvis_broker_install_packages": False,
                        "jarvis_broker_service_manager": "process",
                        "jarvis_broker_user": user,
                        "jarvis_broker_group": group,
                        "jarvis_broker_config_owner": user,
                    },
                    "hosts": brokers,
                },
                "jarvis_nodes": {
                    "vars": {
                        "jarvis_node_model": md.name,
                        "jarvis_node_model_source": str(md.path),
                        "jarvis_node_topic_root": root,
                        "jarvis_node_tls": True,
                        "jarvis_node_secrets_dir": secrets,
                        # This venv already has torch and the package (editable): no downloads.
                        "jarvis_node_venv": sys.prefix,
                        "jarvis_node_venv_create": False,
                        "jarvis_node_install_package": False,
                        "jarvis_node_service_manager": "process",
                        "jarvis_node_user": user,
                        "jarvis_node_group": group,
                        "jarvis_node_create_user": False,
                        "jarvis_node_threads": 1,
                    },
                    "hosts": nodes,
                },
            },
        }
    }


def _recap(output: str) -> dict[str, dict[str, int]]:
    """Per-host counters from the PLAY RECAP."""
    recap = output[output.rindex("PLAY RECAP") :]
    out = {}
    for host, counters in re.findall(r"^(\S+)\s+:\s+(.*)$", recap, re.M):
        out[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
    return out


def _pids(tmp_path: Path) -> dict[str, int]:
    pids = {}
    for pidfile in sorted(tmp_path.glob("*/**/*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pids[pidfile.stem] = int(pidfile.read_text().strip())
    return pids


@pytest.fixture
def deploy_dir(tmp_path: Path) -> Iterator[Path]:
    """A temp dir for the deployment; every process the playbook started is stopped by pid."""
    try:
        yield tmp_path
    finally:
        # Nodes first: with their brokers gone they would wait to clear their status.
        pids = _pids(tmp_path)
        for name in sorted(pids, key=lambda n: "broker" in n):
            stop_pid(pids[name], timeout=10)


async def _generate(md: ModelDir, brokers: list[BrokerAddress], root: str) -> list[int]:
    # The client's MQTT user is its client id: the ACL lets it read only its own results.
    async with RemoteModel(md, brokers, topic_root=root, client_id="chat") as remote:
        await remote.wait_ready(30)
        tok = md.tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
        ids = list(tok.encode(text, add_special_tokens=False))
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        return [e.token_id async for e in remote.generate(ids, params)]


@pytest.mark.slow
@pytest.mark.integration
def test_playbook_deploys_a_mesh_that_generates_and_replays_unchanged(
    deploy_dir: Path, smollm2_dir: ModelDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = deploy_dir
    root = f"test/ansible-{uuid.uuid4().hex[:8]}"
    ports = [free_port(), free_port()]
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump(_inventory(tmp_path, smollm2_dir, root, ports)))
    play = ["ansible-playbook", "-i", str(inventory), "site.yml"]

    first = run_ansible(play, tmp_path, timeout=300)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr
    assert set(_recap(first.stdout)) == {"broker-0", "broker-1", "node-0", "node-1", "node-2"}
    pids = _pids(tmp_path)
    assert len(pids) == 5

    # Only the node's own shards and the manifest were copied.
    node_model = tmp_path / "node-1" / "models" / smollm2_dir.name
    assert sorted(p.name for p in node_model.iterdir()) == sorted(
        ["manifest.json", *smollm2_dir.layer_files(9, 21)]
    )

    secrets = tmp_path / "secrets"
    monkeypatch.setenv("JARVIS_MQTT_USERNAME", "chat")
    monkeypatch.setenv("JARVIS_MQTT_PASSWORD", (secrets / "passwords" / "chat").read_text().strip())
    monkeypatch.setenv("JARVIS_MQTT_TLS_CA", str(secrets / "tls" / "ca.crt"))
    brokers = [BrokerAddress("127.0.0.1", p) for p in ports]
    got = asyncio.run(_generate(smollm2_dir, brokers, root))
    tok = smollm2_dir.tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = list(tok.encode(text, add_special_tokens=False))
    want = [
        e.token_id
        for e in LocalModel(smollm2_dir).generate(ids, SamplingParams(max_new_tokens=NEW_TOKENS))
    ]
    assert got == want

    second = run_ansible(play, tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr
    changed = {host: c["changed"] for host, c in _recap(second.stdout).items()}
    assert changed == dict.fromkeys(changed, 0), changed
    assert _pids(tmp_path) == pids  # nothing was restarted
