"""Half-open layer ranges ``[start, end)``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class LayerRange:
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(
                f"invalid layer range [{self.start}, {self.end}): need 0 <= start < end"
            )

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        """Parse ``"START:END"`` as written on the command line."""
        try:
            start_text, end_text = text.split(":")
            return cls(int(start_text), int(end_text))
        except ValueError as exc:
            raise ValueError(f"layer range {text!r} must look like START:END, e.g. 0:11") from exc

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.start, self.end))

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    def is_first(self) -> bool:
        return self.start == 0

    def is_last(self, num_layers: int) -> bool:
        return self.end == num_layers

    def check_within(self, num_layers: int) -> None:
        if self.end > num_layers:
            raise ValueError(f"layer range {self} exceeds the model's {num_layers} layers")
