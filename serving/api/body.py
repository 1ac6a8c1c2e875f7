"""Request bodies → pydantic models, with every failure a 400 (never 422, never 500).

Checked in order: ``Content-Type: application/json`` (parameters such as ``charset`` ignored),
strict UTF-8, JSON syntax (``NaN``/``Infinity`` refused; 4300+-digit integers are caught), a JSON
*object* at the top level, nesting at most ``MAX_JSON_DEPTH`` deep and no lone surrogates, then the
schema. Error messages name the field
and never echo the input (vLLM #49239: echoing inputs turned a 4 KB request into a 114 MB error).
Unknown top-level fields are accepted and logged, as vLLM does.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sanic import Request

from serving.api.errors import BadRequest

logger = logging.getLogger("xlaserve.api")

M = TypeVar("M", bound=BaseModel)
MAX_REPORTED_ERRORS = 5
# Deepest nesting of arrays and objects a body may have (JSON schemas and tool definitions need a
# few dozen levels; every later stage, pydantic, the template worker and the grammar compiler,
# walks the structure recursively).
MAX_JSON_DEPTH = 128


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(request: Request) -> dict[str, Any]:
    ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise BadRequest("Unsupported Media Type: Only 'application/json' is allowed")
    raw = request.body or b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"The request body is not valid UTF-8 (byte {e.start}).") from None
    if not text.strip():
        raise BadRequest("The request body is empty; expected a JSON object.")
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(f"The request body is not valid JSON: {e.msg} (line {e.lineno}, "
                         f"column {e.colno}).") from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None
    except ValueError as e:  # NaN/Infinity, or an integer with too many digits
        raise BadRequest(f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, got {_json_type(body)}.")
    try:
        _check_strings(body)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None
    return body


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), "a value")


def _check_strings(value: Any, depth: int = 0) -> None:
    """Refuse lone UTF-16 surrogates (valid JSON escapes, invalid Unicode; tokenizers choke) and
    nesting deeper than ``MAX_JSON_DEPTH``."""
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(f"The request body is nested too deeply (more than {MAX_JSON_DEPTH} "
                         "levels).")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(f"The request contains an invalid Unicode character (a lone "
                             f"surrogate) at string offset {e.start}.") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth)
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    errors = err.errors(include_input=False, include_url=False, include_context=False)
    parts = []
    for e in errors[:MAX_REPORTED_ERRORS]:
        loc = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']} (type={e['type']})")
    more = len(errors) - MAX_REPORTED_ERRORS
    if more > 0:
        parts.append(f"and {more} more errors")
    return "Invalid request: " + "; ".join(parts), _param(errors)


def _param(errors: list[Any]) -> str | None:
    """The field the first error is about. A value that fits no member of a union gets one
    error per member, each location ending in the member's name (``stop.str``,
    ``stop.list[str]``); the field is what those locations share (``stop``)."""
    if not errors or not errors[0]["loc"]:
        return None
    loc = list(errors[0]["loc"])
    for e in errors[1:]:
        other = list(e["loc"])
        if other[:1] != loc[:1]:
            continue  # another field's error
        common = 0
        while common < min(len(loc), len(other)) and loc[common] == other[common]:
            common += 1
        loc = loc[:common]
    return ".".join(str(x) for x in loc)


def validate_model(model: type[M], body: dict[str, Any]) -> M:
    try:
        obj = model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise BadRequest(message, param=param) from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None
    extra = getattr(obj, "model_extra", None)
    if extra:
        logger.warning("The following fields were present in the request but ignored: %s",
                       sorted(extra)[:20])
    return obj


def parse_request(request: Request, model: type[M]) -> M:
    return validate_model(model, parse_json_object(request))
