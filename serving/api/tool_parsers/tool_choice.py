"""``tools`` and ``tool_choice``: vLLM's defaults and 400s, and the constraints that enforce a
named or ``required`` choice with any model.

Defaults: ``tool_choice`` omitted (or null) is ``"auto"`` when tools are given, else ``"none"``.
A named choice (``{"type": "function", "function": {"name": N}}``) is enforced as a JSON schema,
N's ``parameters``: the whole output is the arguments. ``"required"`` is enforced as the schema
of a non-empty array of ``{"name": one of the tools, "parameters": its schema}`` objects, with
every tool's ``$defs`` hoisted to the top (vLLM's ``_get_json_schema_from_tool``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from serving.api.errors import BadRequest
from serving.api.tool_parsers.base import FunctionCall, ToolCall, make_tool_call_id
from serving.engine.sampling_params import StructuredSpec

_CORRECT_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolChoice:
    """The resolved choice; ``name`` only for ``mode == "named"``."""

    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """The request's ``tools`` as plain dicts (``[]`` when absent); 400 for a malformed one."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of tool definitions.", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"parameters\": {...}}}.", param="tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}].function.name must be a non-empty string.",
                             param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object.",
                             param="tools")
    return tools


def resolve_tool_choice(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any, *,
                        auto_enabled: bool) -> ToolChoice:
    """``tool_choice`` checked against ``tools`` (None: the field was absent), with vLLM's
    messages. ``auto_enabled``: the server runs with ``--enable-auto-tool-choice`` and a
    ``--tool-call-parser``, which ``"auto"`` with tools needs."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolChoice("none")
    if tools is None:
        raise BadRequest("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if tool_choice not in ("auto", "required") and not isinstance(tool_choice, dict):
        raise BadRequest(f"Invalid value for `tool_choice`: {tool_choice}! Only named tools, "
                         "\"none\", \"auto\" or \"required\" are supported.",
                         param="tool_choice")
    if tool_choice == "required":
        # vLLM 0.11 (and OpenAI): required with an empty tools list behaves as "none".
        return ToolChoice("required") if tools else ToolChoice("none")
    if tool_choice == "auto":
        if not tools:
            return ToolChoice("none")
        if not auto_enabled:
            raise BadRequest("\"auto\" tool choice requires --enable-auto-tool-choice and "
                             "--tool-call-parser to be set", param="tool_choice")
        return ToolChoice("auto")
    fn = tool_choice.get("function")
    if not isinstance(fn, dict):
        raise BadRequest(f"Invalid value for `function`: `{fn}` in `tool_choice`! "
                         f"{_CORRECT_USAGE}", param="tool_choice")
    if "name" not in fn:
        raise BadRequest(f"Expected field `name` in `function` in `tool_choice`! "
                         f"{_CORRECT_USAGE}", param="tool_choice")
    name = fn["name"]
    if not isinstance(name, str) or not name:
        raise BadRequest(f"Invalid `name` in `function`: `{name}` in `tool_choice`! "
                         f"{_CORRECT_USAGE}", param="tool_choice")
    if not any(t["function"]["name"] == name for t in tools):
        raise BadRequest("The tool specified in `tool_choice` does not match any of the "
                         "specified `tools`", param="tool_choice")
    return ToolChoice("named", name)


def tool_choice_schema(tools: Sequence[Mapping[str, Any]],
                       choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON schema that enforces ``choice`` (None for none and auto)."""
    if choice.mode == "named":
        fn = next(t["function"] for t in tools if t["function"]["name"] == choice.name)
        return dict(fn.get("parameters") or _EMPTY_PARAMETERS)
    if choice.mode != "required":
        return None
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        fn = tool["function"]
        params = dict(fn.get("parameters") or _EMPTY_PARAMETERS)
        for name, definition in (params.pop("$defs", None) or {}).items():
            if name in defs and defs[name] != definition:
                raise BadRequest(f"Tool definition '{name}' has multiple schemas, which is not "
                                 "supported.", param="tools")
            defs[name] = definition
        # Closed: vLLM's default backend (xgrammar, strict mode) allows no other keys either;
        # llguidance's default would let a model wander off into "description": ... keys.
        options.append({"properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                       "parameters": params},
                        "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": options}}
    if defs:
        schema["$defs"] = defs
    return schema


def tool_choice_spec(tools: Sequence[Mapping[str, Any]],
                     choice: ToolChoice) -> StructuredSpec | None:
    """``tool_choice_schema`` as the request's structured-output constraint."""
    schema = tool_choice_schema(tools, choice)
    return None if schema is None else StructuredSpec("json", json.dumps(schema,
                                                                         ensure_ascii=False))


def named_tool_call(name: str, output: str) -> ToolCall:
    """A named choice's response: one call whose arguments are the (constrained) output."""
    return ToolCall(make_tool_call_id(), FunctionCall(name, output))


def required_tool_calls(output: str) -> tuple[ToolCall, ...]:
    """A ``required`` choice's output, ``[{"name", "parameters"}, ...]``, as calls; () when it
    is not such a list (a stop string or max_tokens cut it short)."""
    try:
        items = json.loads(output)
    except json.JSONDecodeError:
        return ()
    if not isinstance(items, list) or not all(
            isinstance(x, dict) and isinstance(x.get("name"), str) for x in items):
        return ()
    return tuple(ToolCall(make_tool_call_id(),
                          FunctionCall(x["name"], json.dumps(x.get("parameters", {}),
                                                             ensure_ascii=False)))
                 for x in items)
