"""Tool use for `/v2/chat`: a request with `tools` whose last message is the user's gets a tool call.

Deterministic like the rest of the emulator: the first tool is called, after a one-sentence tool plan,
with every parameter its JSON schema lists filled by a placeholder of its type. Tool definitions are
billed as input (their JSON text), the plan and the arguments as output. A conversation that ends with
tool results (`role: tool`) is answered with text as usual.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.tokens import Reply, split_tokens

_PLACEHOLDERS: dict[str, Any] = {
    "string": "example",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "object": {},
}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # JSON schema


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text, as Cohere sends it
    plan_tokens: tuple[str, ...]
    argument_tokens: tuple[str, ...]  # the arguments split as a stream sends them

    @property
    def plan(self) -> str:
        return "".join(self.plan_tokens)

    def reply(self) -> Reply:
        """For usage: what the model generated."""
        return Reply(self.plan_tokens + self.argument_tokens, "TOOL_CALL")


def parse_v2_tools(body: dict[str, Any]) -> list[Tool]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of {'type': 'function', 'function': {...}} objects")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"tools[{i}].function.name must be a non-empty string")
        parameters = function.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append(Tool(name, parameters))
    return out


def tool_texts(body: dict[str, Any]) -> list[str]:
    """What a request's tool definitions add to its billed input."""
    tools = body.get("tools")
    return [json.dumps(tools, separators=(",", ":"))] if tools else []


def should_call(body: dict[str, Any], tools: list[Tool], messages: list[Any]) -> bool:
    if not tools or body.get("tool_choice") == "NONE":
        return False
    last = messages[-1] if messages else None
    return isinstance(last, dict) and last.get("role") == "user"


def tool_call(tool: Tool, seed: str) -> ToolCall:
    properties = tool.parameters.get("properties")
    arguments: dict[str, Any] = {}
    if isinstance(properties, dict):
        for name, schema in properties.items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            arguments[name] = _PLACEHOLDERS.get(kind if isinstance(kind, str) else "string", "example")
    text = json.dumps(arguments, separators=(",", ":"))
    digest = hashlib.sha256(f"{tool.name}\n{seed}".encode()).hexdigest()
    return ToolCall(
        call_id=f"{tool.name}_{digest[:8]}",
        name=tool.name,
        arguments=text,
        plan_tokens=tuple(split_tokens(f"I will use {tool.name} to answer this.")),
        argument_tokens=tuple(split_tokens(text)),
    )
