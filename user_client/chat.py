"""`jarvis-chat`: a streaming terminal chat with a model whose layers run on the mesh."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jarvis_mqtt.brokers import BrokerAddress, parse_brokers
from jarvis_mqtt.cli import add_auth_flags, add_sampling_flags, apply_auth_flags, sampling_from_args
from jarvis_mqtt.errors import JarvisError
from jarvis_mqtt.generate import TokenEvent
from jarvis_mqtt.membership import format_layers, parse_layers

HELP = "/reset clears the history · /stats timings · /route last route · /quit leaves"


def _brokers(a: argparse.Namespace) -> tuple[list[BrokerAddress], str]:
    """Brokers and topic root from flags, else from the local mesh `jarvis mesh up` started."""
    if a.broker:
        return parse_brokers(a.broker), a.topic_root or "jarvis"
    from jarvis_mqtt.mesh import LocalMesh

    mesh = LocalMesh.load()
    return mesh.addresses, a.topic_root or mesh.topic_root


class Chat:
    """Chat state: history, the remote model, what the last reply took."""

    def __init__(self, remote: Any, a: argparse.Namespace) -> None:
        from rich.console import Console

        self.remote = remote
        self.args = a
        self.params = sampling_from_args(a)
        self.history: list[dict[str, str]] = []
        if a.system:
            self.history.append({"role": "system", "content": a.system})
        self.console = Console(highlight=False)
        self.last: list[TokenEvent] = []

    def prompt_ids(self, user: str) -> list[int]:
        tok = self.remote.tokenizer
        self.history.append({"role": "user", "content": user})
        text = tok.apply_chat_template(self.history, add_generation_prompt=True)
        return list(tok.encode(text, add_special_tokens=False))

    async def reply(self, user: str, *, stream: bool) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        async for ev in self.remote.generate(self.prompt_ids(user), self.params):
            events.append(ev)
            if stream and ev.text:
                # Tokens produced with layers skipped are dim: the user can see degradation.
                self.console.print(ev.text, end="", style="dim" if ev.skipped else None)
        if stream:
            self.console.print()
        text = "".join(e.text for e in events)
        self.history.append({"role": "assistant", "content": text})
        self.last = events
        return events

    def stats(self) -> str:
        ev = self.last
        if not ev:
            return "no reply yet"
        decode = [e.latency for e in ev[1:]] or [0.0]
        return (
            f"{len(ev)} tokens · first token {ev[0].latency * 1e3:.0f} ms · "
            f"{1 / max(statistics.mean(decode), 1e-9):.1f} tok/s · "
            f"median {statistics.median(decode) * 1e3:.1f} ms/token"
        )

    def route(self) -> str:
        if not self.last:
            return "no reply yet"
        lines = []
        for h in self.last[-1].route:
            replay = "  (cache rebuilt by replay)" if h.get("replay") else ""
            lines.append(f"  [{h['start']:>3}, {h['end']:>3})  {h['node']}  {h['ms']} ms{replay}")
        skipped = sorted({i for e in self.last for i in e.skipped})
        if skipped:
            lines.append(f"  skipped layers: {format_layers(skipped)}")
        return "\n".join(lines)


def as_json(events: Sequence[TokenEvent]) -> dict[str, Any]:
    """Machine-readable reply."""
    return {
        "text": "".join(e.text for e in events),
        "token_ids": [e.token_id for e in events],
        "latency_ms": [round(e.latency * 1e3, 3) for e in events],
        "route": [e.route for e in events],
        "skipped": [e.skipped for e in events],
    }


async def run(a: argparse.Namespace) -> int:
    from jarvis_mqtt.client import RemoteModel

    brokers, root = _brokers(a)
    remote = RemoteModel.open(
        a.model,
        brokers,
        models_dir=Path(a.models_dir) if a.models_dir else None,
        topic_root=root,
        step_timeout=a.timeout,
        allow_skip=not a.no_skip,
        never_skip=None if a.never_skip is None else parse_layers(a.never_skip, "--never-skip"),
    )
    async with remote:
        await remote.wait_ready(a.wait)
        chat = Chat(remote, a)
        if a.prompt is not None:
            events = await chat.reply(a.prompt, stream=not a.json)
            if a.json:
                print(json.dumps(as_json(events)))
            return 0
        chat.console.print(f"[bold]{remote.model}[/] over {len(brokers)} broker(s) · {HELP}")
        while True:
            try:
                line = await asyncio.to_thread(chat.console.input, "[bold green]> [/]")
            except EOFError:
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                chat.history = chat.history[:1] if a.system else []
                chat.console.print("[dim]history cleared[/]")
            elif line == "/stats":
                chat.console.print(chat.stats())
            elif line == "/route":
                chat.console.print(chat.route())
            elif line.startswith("/"):
                chat.console.print(f"[red]unknown command[/] · {HELP}")
            else:
                try:
                    await chat.reply(line, stream=True)
                except JarvisError as e:
                    chat.history.pop()
                    chat.console.print(f"[red]error:[/] {e}")


def build_parser() -> argparse.ArgumentParser:
    """The `jarvis-chat` argument parser."""
    p = argparse.ArgumentParser(prog="jarvis-chat", description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--broker", help="HOST:PORT[,...]; default: the local mesh (`jarvis mesh up`)")
    p.add_argument("--topic-root", default=None)
    p.add_argument("-p", "--prompt", help="answer one prompt and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--json", action="store_true", help="machine-readable output (with -p)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per step")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for all layers")
    p.add_argument(
        "--no-skip", action="store_true", help="fail instead of skipping layers of a dead node"
    )
    p.add_argument(
        "--never-skip",
        default=None,
        help="layers never skipped (default: the model's criticality.json, else first,last)",
    )
    add_sampling_flags(p)
    add_auth_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `jarvis-chat`."""
    a = build_parser().parse_args(argv)
    try:
        apply_auth_flags(a)
        return asyncio.run(run(a))
    except JarvisError as e:
        print(f"jarvis-chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
