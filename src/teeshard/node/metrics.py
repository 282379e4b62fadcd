"""A few Prometheus counters and gauges, rendered in the text exposition format."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


class Metrics:
    def __init__(self, labels: dict[str, str]) -> None:
        self._labels = labels
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help_text)
        self._gauges[name] = read

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._counters[(name, tuple(sorted(labels.items())))] += amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
