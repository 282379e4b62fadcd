"""Request models of structured output and tool calls, as OpenAI's API spells them.

Only the shapes: ``teeshard.entry.grammar`` turns them into grammars and
``teeshard.entry.tools`` renders, constrains and parses tool calls. Strict where a
mistake would otherwise pass silently (unknown fields refused).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_TOOLS",
    "FunctionCall",
    "FunctionDef",
    "FunctionName",
    "JsonSchemaFormat",
    "NamedToolChoice",
    "ResponseFormat",
    "Tool",
    "ToolCall",
    "ToolChoice",
]

# OpenAI's rule for function and schema names
Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
MAX_TOOLS = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Name
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str = Name
    description: str | None = None
    # a JSON schema of the arguments; OpenAI's default: an object with any properties
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str = Name


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    """A call in an assistant message fed back: arguments as the JSON text OpenAI sends."""

    name: str = Name
    arguments: str


class ToolCall(_Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall

    def template(self) -> dict[str, Any]:
        """As chat templates take a call: its arguments a mapping when they are an object."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        if not isinstance(arguments, dict):
            arguments = self.function.arguments
        function = {"name": self.function.name, "arguments": arguments}
        return {"id": self.id, "type": "function", "function": function}
