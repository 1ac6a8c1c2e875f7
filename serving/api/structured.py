"""Every request form of a structured-output constraint, normalised into one ``StructuredSpec``.

The forms (vLLM's names): the deprecated ``guided_choice``, ``guided_regex``, ``guided_json``,
``guided_grammar``, ``guided_whitespace_pattern`` and ``guided_decoding_backend``; the
``structured_outputs`` object (``choice | regex | json | grammar | json_object |
structural_tag``, ``disable_any_whitespace``, ``disable_additional_properties``,
``whitespace_pattern``, ``disable_fallback``); and OpenAI's ``response_format`` (``text``,
``json_object``, ``json_schema`` strict or not, ``structural_tag``). A request names at most one
kind across all of them; anything else is a ``BadRequest`` (400) naming the field, as vLLM
answers it. Whether the grammar compiles is ``compile_grammar``'s question (a 400 "Grammar
error: ..."), asked off the event loop.

Both generation routes call ``structured_spec`` and then compile through
``serving.api.generation.request_grammar``; the engine applies the grammar as a token mask.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

from serving.api.errors import BadRequest
from serving.engine.sampling_params import StructuredKind, StructuredSpec
from serving.engine.structured_output import CompiledGrammar, GrammarBackend, GrammarError

# The server's one grammar backend, in vLLM's name for llguidance.
SERVER_BACKEND = "guidance"

_STRUCTURED_OUTPUTS_KEYS = frozenset({
    "json", "regex", "choice", "grammar", "json_object", "structural_tag",
    "whitespace_pattern", "disable_any_whitespace", "disable_additional_properties",
    "disable_fallback",
})
_RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")


def structured_spec(req: Any, *, server_backend: str = SERVER_BACKEND) -> StructuredSpec | None:
    """The one constraint ``req`` (a completion or chat request) asks for, or None.

    Reads the guided fields, ``structured_outputs`` and ``response_format``; raises
    ``BadRequest`` for two kinds at once, a field of the wrong type, an empty choice list, a
    schema that is not an object, ``json_schema`` without a schema, and a per-request backend
    other than ``server_backend``.
    """
    backend = getattr(req, "guided_decoding_backend", None)
    if backend is not None and backend != server_backend:
        raise BadRequest(
            "Request-level structured output backend selection is not supported. The request "
            f"specified '{backend}', but this server was started with '{server_backend}'. "
            "Remove guided_decoding_backend from the request.", param="guided_decoding_backend")

    found: list[tuple[str, StructuredSpec]] = []  # (the field it came from, the constraint)
    options: dict[str, Any] = {}
    pattern = getattr(req, "guided_whitespace_pattern", None)
    if pattern is not None:
        options["whitespace_pattern"] = _string(pattern, "guided_whitespace_pattern")

    guided: tuple[tuple[str, StructuredKind], ...] = (
        ("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
        ("guided_grammar", "grammar"))
    for field, kind in guided:
        value = getattr(req, field, None)
        if value is not None:
            found.append((field, _kind_spec(kind, value, field)))

    so = getattr(req, "structured_outputs", None)
    if so is not None:
        found.extend(_structured_outputs(so, options))

    rf = getattr(req, "response_format", None)
    if rf is not None:
        from_rf = _response_format(rf)
        if from_rf is not None:
            found.append(("response_format", from_rf))

    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(sorted({f for f, _ in found}))
        raise BadRequest("You can only use one kind of structured outputs constraint but "
                         f"multiple are specified ({names}).", param=found[1][0])
    spec = found[0][1]
    if options and spec.kind in ("json", "json_object"):
        spec = StructuredSpec(spec.kind, spec.spec, **options)
    return spec


def with_tool_constraint(spec: StructuredSpec | None,
                         tool_spec: StructuredSpec | None) -> StructuredSpec | None:
    """The request's constraint once a named or ``required`` ``tool_choice`` (which is enforced
    as a JSON schema) is added: both at once is a 400, as in vLLM."""
    if tool_spec is None:
        return spec
    if spec is not None:
        raise BadRequest("You can only either use constraints for structured outputs or tools, "
                         "not both.", param="tool_choice")
    return tool_spec


async def compile_grammar(backend: GrammarBackend, spec: StructuredSpec,
                          pool: Executor) -> CompiledGrammar:
    """``backend.compile(spec)`` on ``pool`` (the API's cpu_pool: off the event loop and off
    the engine thread); a grammar that does not compile is a 400 "Grammar error: ..."."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(pool, backend.compile, spec)
    except GrammarError as e:
        raise BadRequest(str(e)) from None


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string, got {type(value).__name__}.", param=field)
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field} must be a boolean, got {type(value).__name__}.", param=field)
    return value


def _schema_text(value: Any, field: str) -> str:
    """A JSON schema given as an object or as JSON text, as JSON text (key order kept: it is
    the order properties are generated in)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRequest(f"{field} is not valid JSON: {e}", param=field) from None
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be a JSON schema object, got "
                         f"{type(value).__name__}.", param=field)
    return json.dumps(value, ensure_ascii=False)


def _kind_spec(kind: StructuredKind, value: Any, field: str) -> StructuredSpec:
    if kind == "json":
        return StructuredSpec("json", _schema_text(value, field))
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise BadRequest(f"{field} must be a list of strings.", param=field)
        if not value:
            raise BadRequest(f"Choice '{value}' cannot be an empty list", param=field)
        return StructuredSpec("choice", tuple(value))
    if kind == "structural_tag":
        if isinstance(value, dict):
            return StructuredSpec("structural_tag", json.dumps(value, ensure_ascii=False))
        return StructuredSpec("structural_tag", _string(value, field))
    return StructuredSpec(kind, _string(value, field))


def _structured_outputs(so: Any, options: dict[str, Any]) -> list[tuple[str, StructuredSpec]]:
    """The kinds in a ``structured_outputs`` object; its options go into ``options``."""
    if not isinstance(so, Mapping):
        raise BadRequest("structured_outputs must be an object.", param="structured_outputs")
    unknown = sorted(set(so) - _STRUCTURED_OUTPUTS_KEYS)
    if unknown:
        raise BadRequest(f"structured_outputs has unknown fields: {', '.join(unknown)}.",
                         param="structured_outputs")
    found = []
    kinds: tuple[StructuredKind, ...] = ("json", "regex", "choice", "grammar", "structural_tag")
    for kind in kinds:
        if so.get(kind) is not None:
            field = f"structured_outputs.{kind}"
            found.append((field, _kind_spec(kind, so[kind], field)))
    if so.get("json_object") is not None and _bool(so["json_object"],
                                                    "structured_outputs.json_object"):
        found.append(("structured_outputs.json_object", StructuredSpec("json_object")))
    if so.get("whitespace_pattern") is not None:
        options["whitespace_pattern"] = _string(so["whitespace_pattern"],
                                                "structured_outputs.whitespace_pattern")
    for flag in ("disable_any_whitespace", "disable_additional_properties"):
        if so.get(flag) is not None and _bool(so[flag], f"structured_outputs.{flag}"):
            options[flag] = True
    # disable_fallback: there is one backend and never a fallback, so it changes nothing.
    if so.get("disable_fallback") is not None:
        _bool(so["disable_fallback"], "structured_outputs.disable_fallback")
    return found


def _response_format(rf: Any) -> StructuredSpec | None:
    """``response_format`` (the protocol's model, or a plain dict) as a constraint."""
    data: dict[str, Any] = rf.model_dump() if hasattr(rf, "model_dump") else dict(rf)
    kind = data.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise BadRequest(f"response_format type must be one of {', '.join(_RESPONSE_FORMATS)}; "
                         f"got {kind!r}.", param="response_format")
    if kind != "json_schema" and data.get("json_schema") is not None:
        raise BadRequest("response_format.json_schema only applies to type 'json_schema'.",
                         param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object")
    if kind == "json_schema":
        js = data.get("json_schema")
        if not isinstance(js, dict):
            raise BadRequest("response_format type 'json_schema' needs a json_schema object.",
                             param="response_format.json_schema")
        # OpenAI's field is "schema"; vLLM also reads its alias "json_schema". "strict" changes
        # nothing: the schema is always enforced.
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:
            raise BadRequest("response_format.json_schema needs a schema.",
                             param="response_format.json_schema.schema")
        return StructuredSpec("json", _schema_text(schema, "response_format.json_schema.schema"))
    tag = {k: v for k, v in data.items() if k != "json_schema"}
    return _kind_spec("structural_tag", tag, "response_format")
