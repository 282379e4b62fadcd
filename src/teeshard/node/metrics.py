"""A stage's Prometheus metrics, rendered in the text exposition format.

The stage keeps plain counters (``NodeService.counters``); this module only reads
them at scrape time, so the step path never calls into metrics code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from teeshard.node.service import NodeService

__all__ = ["Metrics", "series_total", "stage_metrics"]


class Metrics:
    def __init__(self, labels: dict[str, str]) -> None:
        self._labels = labels
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._hooks: list[Callable[[], None]] = []

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help_text)
        self._gauges[name] = read

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a counter to the value its owner keeps (from a ``before_render`` hook)."""
        self._counters[(name, tuple(sorted(labels.items())))] = float(value)

    def before_render(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)

    def render(self) -> str:
        for hook in self._hooks:
            hook()
        lines: list[str] = []
        for name, (kind, help_text) in sorted(self._help.items()):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            if kind == "gauge":
                lines.append(f"{name}{self._format({})} {self._gauges[name]()}")
                continue
            samples = [(lbl, v) for (n, lbl), v in self._counters.items() if n == name]
            for label_items, value in sorted(samples) or [((), 0.0)]:
                lines.append(f"{name}{self._format(dict(label_items))} {value}")
        return "\n".join(lines) + "\n"

    def _format(self, extra: dict[str, str]) -> str:
        labels = {**self._labels, **extra}
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        return "{" + inner + "}" if inner else ""


def series_total(text: str, name: str, **labels: str) -> float:
    """The sum of series ``name`` in exposition ``text`` over the samples carrying
    ``labels`` (a reader's helper: benchmarks and tests scrape ``/metrics`` with it)."""
    total = 0.0
    wanted = [f'{k}="{_escape(v)}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] == name and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def stage_metrics(service: NodeService) -> Metrics:
    """The metrics of one stage, read from its counters and sessions when rendered."""
    shard, counters, sessions = service.shard, service.counters, service.sessions
    metrics = Metrics({"model": service.model_name, "layers": str(shard.layer_range)})
    metrics.counter("teeshard_steps_total", "Pipeline steps run on this node")
    metrics.counter("teeshard_tokens_processed_total", "Token positions run through this shard")
    metrics.counter("teeshard_step_seconds_total", "Time spent in local compute")
    metrics.counter("teeshard_batches_total", "Batched forwards run (each holds 1+ steps)")
    metrics.counter("teeshard_batched_rows_total", "Token positions over all batched forwards")
    metrics.counter(
        "teeshard_inline_batches_total",
        "Batched forwards run on the event loop's thread (a lone one-row step)",
    )
    metrics.counter(
        "teeshard_batch_gather_timeouts_total",
        "Batches that waited for other active sessions' steps until the deadline",
    )
    metrics.counter("teeshard_errors_total", "Failed requests by error code")
    metrics.counter("teeshard_pipeline_connections_total", "Pipeline sockets admitted")
    metrics.counter(
        "teeshard_pipeline_refused_total", "Pipeline sockets refused before any frame, by reason"
    )
    metrics.gauge("teeshard_sessions_open", "Open sessions", lambda: len(sessions))
    metrics.gauge(
        "teeshard_pipeline_frames_in_flight",
        "Pipeline frames being handled",
        lambda: counters.frames_in_flight,
    )
    metrics.gauge(
        "teeshard_steps_waiting",
        "Steps submitted to the batch scheduler and not finished",
        lambda: service.scheduler.waiting,
    )
    metrics.gauge(
        "teeshard_cache_reserved_tokens", "KV positions reserved", lambda: sessions.reserved_tokens
    )

    def read() -> None:
        metrics.set("teeshard_steps_total", counters.steps)
        metrics.set("teeshard_tokens_processed_total", counters.tokens_processed)
        metrics.set("teeshard_step_seconds_total", counters.step_seconds)
        metrics.set("teeshard_batches_total", counters.batches)
        metrics.set("teeshard_batched_rows_total", counters.batched_rows)
        metrics.set("teeshard_inline_batches_total", counters.inline_batches)
        metrics.set("teeshard_batch_gather_timeouts_total", counters.gather_timeouts)
        metrics.set("teeshard_pipeline_connections_total", counters.pipeline_connections)
        for code, count in counters.errors.items():
            metrics.set("teeshard_errors_total", count, code=code)
        for reason, count in counters.refused.items():
            metrics.set("teeshard_pipeline_refused_total", count, reason=reason)

    metrics.before_render(read)
    return metrics
