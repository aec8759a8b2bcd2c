"""The dashboard's panels; each takes a ``Snapshot`` and redraws itself from it."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, ProgressBar, Sparkline, Static

from tui.source import Snapshot

GIB = 1 << 30
BAR_STYLES = ("green", "cyan", "magenta", "yellow", "blue", "red")


def memory_bar(used: int, total: int, width: int = 12) -> Text:
    fraction = used / total if total else 0.0
    filled = round(fraction * width)
    style = "red" if fraction > 0.9 else "yellow" if fraction > 0.7 else "green"
    bar = Text("█" * filled, style=style)
    bar.append("░" * (width - filled), style="grey37")
    bar.append(f" {used / GIB:.1f}/{total / GIB:.1f} GiB")
    return bar


def _rate(value: float | None, unit: str, scale: float) -> str:
    return f"{value / scale:.1f} {unit}" if value else "—"


class DevicesTable(DataTable):
    """Every peer the head knows: identity, memory, measured rates, link, layers."""

    COLUMNS = ("name", "peer id", "address", "memory", "compute", "bandwidth", "rtt", "status")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS, "layers")

    def show(self, snapshot: Snapshot) -> None:
        self.clear()
        for d in snapshot.devices:
            status: dict[str, Any] = d.get("status") or {}
            profile: dict[str, Any] = d.get("profile") or {}
            total = status.get("memory_total", 0)
            used = total - status.get("memory_available", 0)
            layers = status.get("layers")
            memory = memory_bar(used, total) if total else Text("—")
            if status.get("memory_budget"):  # the peer's --max-memory
                memory.append(f" max {status['memory_budget'] / 2**20:.0f} MiB", style="cyan")
            state = "ok" if d.get("healthy") else f"error: {d.get('error')}"
            if d.get("healthy") and status.get("active_requests"):
                state = f"busy ({status['active_requests']})"
            self.add_row(
                d["name"],
                d["peer_id"][:12],
                d["address"].removeprefix("ws://").removesuffix("/dnet/2"),
                memory,
                _rate(profile.get("flops_s"), "GFLOP/s", 1e9),
                _rate(profile.get("bandwidth_bytes_s"), "GB/s", 1e9),
                f"{d['rtt_ms']:.2f} ms" if d.get("rtt_ms") is not None else "—",
                Text(state, style="green" if d.get("healthy") else "red"),
                f"{layers[0]}–{layers[1]}" if layers else "—",
                key=d["peer_id"],
            )


class PlacementPanel(Static):
    """The ring in order, each peer's layers drawn to scale, predicted vs measured
    stage time, and the peers the solver left out with its reason."""

    def show(self, snapshot: Snapshot, width: int = 48) -> None:
        topology = snapshot.status.get("topology")
        if not topology:
            self.update(
                Text(
                    "No placement yet: prepare a topology (F5) or load a model (F6).",
                    style="italic grey62",
                )
            )
            return
        measured = {
            d["peer_id"]: (d.get("status") or {}).get("decode_step_s", 0.0)
            for d in snapshot.devices
        }
        rows = {
            d["peer_id"]: (d.get("status") or {}).get("step_rows", 0.0) for d in snapshot.devices
        }
        n = max(topology["num_layers"], 1)
        text = Text()
        text.append(f"{topology['objective']} placement over {n} layers, ", style="bold")
        text.append(
            f"predicted {topology['predicted_tokens_per_s']:.1f} tok/s, "
            f"first token {topology['predicted_ttft_s'] * 1e3:.0f} ms\n"
        )
        for i, a in enumerate(topology["assignments"]):
            start = round(a["start"] / n * width)
            end = max(round(a["end"] / n * width), start + 1)
            style = BAR_STYLES[i % len(BAR_STYLES)]
            text.append(f"{i + 1}. {a['name'][:14]:<14} ")
            text.append("·" * start, style="grey30")
            text.append("█" * (end - start), style=style)
            text.append("·" * (width - end), style="grey30")
            got = measured.get(a["peer_id"]) or 0.0
            shown = f"{got * 1e3:6.2f} ms" if got else "     —   "
            text.append(
                f" {a['start']:>3}–{a['end']:<3} predicted "
                f"{a['predicted_stage_s'] * 1e3:6.2f} ms  measured {shown}"
            )
            batch = rows.get(a["peer_id"]) or 0.0
            # A step of several requests takes longer than the one-request prediction.
            text.append(f" ({batch:.1f} requests a step)\n" if batch >= 1.05 else "\n")
        if topology.get("split_reason"):
            text.append(f"   split: {topology['split_reason']}\n", style="cyan")
        names = {d["peer_id"]: d["name"] for d in snapshot.devices}
        for peer_id, reason in topology["excluded"]:
            who = f"{names[peer_id]} ({peer_id[:12]})" if peer_id in names else peer_id[:12]
            text.append(f"   left out {who}: {reason}\n", style="yellow")
        self.update(text)


class ModelPanel(Vertical):
    """The loaded (or loading) model, and one progress bar per peer while loading."""

    def compose(self) -> ComposeResult:
        yield Static(id="model-summary")
        yield Vertical(id="load-bars")

    def show(self, snapshot: Snapshot) -> None:
        head = snapshot.status.get("head") or {}
        model = snapshot.status.get("model")
        text = Text()
        state = head.get("state", "unknown")
        text.append("state ", style="grey62")
        text.append(state + "\n", style="bold green" if state == "loaded" else "bold yellow")
        if model:
            quant = model.get("quantization")
            kind = f"{quant['bits']}-bit" if quant else model["dtype"]
            if model.get("format") == "gguf":
                kind = f"GGUF {model['dtype']}"
            text.append("model ", style="grey62")
            text.append(model["id"].rsplit("/", 1)[-1] + "\n", style="bold")
            text.append(
                f"{model['architecture']} · {kind} · {model['num_layers']} layers · "
                f"context {model['context']}"
            )
        elif head.get("pending_model"):
            text.append(f"{state} ", style="grey62")
            text.append(str(head["pending_model"]).rsplit("/", 1)[-1] + " …", style="bold")
            if head.get("replanning"):  # the head re-plans by itself: say why
                text.append(f"\nre-planning: {head['replanning']}", style="bold yellow")
        else:
            text.append("no model loaded", style="italic grey62")
        self.query_one("#model-summary", Static).update(text)
        bars = self.query_one("#load-bars", Vertical)
        progress = head.get("load_progress") or {}
        names = {d["peer_id"]: d["name"] for d in snapshot.devices}
        if state != "loading":
            progress = {}
        existing = {child.id: child for child in bars.children}
        wanted = {f"load-{pid[:12]}" for pid in progress}
        for key, child in existing.items():
            if key not in wanted:
                child.remove()
        for pid, step in progress.items():
            key = f"load-{pid[:12]}"
            done, total = int(step.get("done", 0)), max(int(step.get("total", 0)), 1)
            what = load_label(step)
            if key in existing:
                existing[key].query_one(ProgressBar).update(total=total, progress=done)
                existing[key].query_one(".load-what", Label).update(what)
            else:
                bar = ProgressBar(total=total, show_eta=False)
                bar.progress = done
                bars.mount(
                    Horizontal(
                        Label(f"{names.get(pid, pid[:12])[:14]:<14} "),
                        bar,
                        Label(what, classes="load-what"),
                        id=key,
                        classes="load-row",
                    )
                )


def load_label(step: dict[str, Any]) -> str:
    """What a peer's load bar stands for: ``fetching 12 MB/s from hub``, ``reading``."""
    phase = str(step.get("phase", ""))
    if phase != "fetching":
        return f" {phase}"
    rate = float(step.get("rate", 0.0))
    return f" {rate / 1e6:.1f} MB/s from {step.get('source', '?')}"


class ThroughputPanel(Vertical):
    """Tokens/s over time, time to first token, requests in flight."""

    def compose(self) -> ComposeResult:
        yield Static(id="throughput-figures")
        yield Sparkline([], id="throughput-spark")

    def show(self, snapshot: Snapshot) -> None:
        head = snapshot.status.get("head") or {}
        ttft = head.get("last_ttft_s")
        text = Text()
        text.append(f"{head.get('tokens_per_s', 0.0):.1f}", style="bold")
        text.append(" tok/s   first token ")
        text.append(f"{ttft * 1e3:.0f} ms" if ttft is not None else "—", style="bold")
        text.append(f"\n{head.get('active_requests', 0)}/{head.get('max_concurrent', 0)} ")
        lanes = [n for n in head.get("decode_lanes") or () if n]
        if lanes:  # running requests step together, one batch per lane
            text.append("requests, batched ")
            text.append(" + ".join(str(n) for n in lanes), style="bold")
            text.append(" · ")
        else:
            text.append("requests in flight · ")
        text.append(f"{head.get('requests_served', 0)} served · ")
        text.append(f"{head.get('tokens_generated', 0)} tokens")
        self.query_one("#throughput-figures", Static).update(text)
        self.query_one("#throughput-spark", Sparkline).data = list(snapshot.rates) or [0.0]
