"""Chat templates: loading, content-format detection, and sandboxed rendering with a time limit.

Who calls: ``serving.api.template_worker`` runs one ``ChatRenderer`` in each of its worker
processes (template from ``--chat-template`` or the tokenizer / GGUF metadata); the server process
itself only checks the server's template at startup (``check_server_template``) and never renders.

Security contract (chat templates ship inside model files, so they are untrusted code):
- every template, the server's and a request's, is compiled in one ``ImmutableSandboxedEnvironment``
  subclass: attributes starting with ``_`` (``__class__``, ``__globals__``, ...) are refused by the
  sandbox, mutating methods are refused, ``lipsum`` is gone, and ``*``/``**`` are bounded;
- each render has a deadline: the sandbox checks it on every call, attribute and item access and
  on every ``range`` step, so a runaway template stops itself with a ``ChatTemplateError``. A single
  long C call (a huge integer product) is not interrupted by it: that is why rendering happens in
  worker processes with a memory limit, which the server kills past a hard deadline;
- request templates are refused unless the operator passed ``--trust-request-chat-template``
  (checked by the caller), and ``chat_template_kwargs`` cannot override the variables this module
  sets itself.

The rendered text matches ``transformers``' ``apply_chat_template(..., tokenize=False)``: the same
environment options (trim_blocks, lstrip_blocks, loopcontrols, ``{% generation %}``), the same
globals (``raise_exception``, ``strftime_now``, ``tojson`` without HTML escaping) and the same
special-token variables.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes as jn
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger("xlaserve.api")

ContentFormat = Literal["string", "openai"]

DEFAULT_RENDER_TIMEOUT_S = 5.0
# Largest string or list a template may build with ``*`` and largest integer power it may take.
MAX_TEMPLATE_SEQUENCE = 1_000_000
MAX_POWER_BITS = 4096
# Variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "tokenize", "conversation", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "chat_template",
})
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
MEDIA_PART_TYPES = frozenset({
    "image_url", "input_image", "image", "image_embeds", "image_pil", "audio_url", "input_audio",
    "audio", "video_url", "video", "file", "input_file",
})


class ChatTemplateError(ValueError):
    """A template or a conversation could not be rendered; the message is fit for the client."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file path, or the template itself when it looks like Jinja."""
    if value is None:
        return None
    try:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {value!r}: {e.strerror}") from e
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"{value!r} looks like a file path, but it does not exist "
                     "(pass an existing file or an inline Jinja template).")


# --------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------

_deadline = threading.local()


def _check_deadline() -> None:
    limit = getattr(_deadline, "at", None)
    if limit is not None and time.monotonic() > limit:
        raise ChatTemplateError(
            f"Chat template rendering exceeded its time limit of {_deadline.budget:g} s.")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus a per-thread deadline and bounded ``*`` / ``**``."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (isinstance(seq, str | list | tuple) and isinstance(count, int)
                        and len(seq) * count > MAX_TEMPLATE_SEQUENCE):
                    raise SecurityError("the template tried to build a sequence longer than "
                                        f"{MAX_TEMPLATE_SEQUENCE}")
            return left * right
        if operator == "**":
            if (isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                    and right * math.log2(abs(left)) > MAX_POWER_BITS):
                raise SecurityError("the template tried to compute a power that is too large")
            return left**right
        return super().call_binop(context, operator, left, right)


def _bounded_range(*args: int) -> Iterator[int]:
    """``range`` with the sandbox's size cap and a deadline check every 1024 steps."""
    rng = range(*args)
    if len(rng) > jinja2.sandbox.MAX_RANGE:
        raise OverflowError(f"range too big, the sandbox allows at most {jinja2.sandbox.MAX_RANGE}")
    for i, value in enumerate(rng):
        if i & 1023 == 0:
            _check_deadline()
        yield value


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads a class attribute)

    def parse(self, parser: Any) -> jn.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jn.Scope(body).set_lineno(lineno)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed names (no way to shadow dunders)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attributes may not start with '_': {name!r}")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as transformers renders).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_environment() -> jinja2.Environment:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.pop("lipsum", None)  # unbounded CPU for no template's benefit
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       range=_bounded_range, namespace=_SafeNamespace, dict=dict)
    return env


# --------------------------------------------------------------------------------------------
# Content-format detection
# --------------------------------------------------------------------------------------------


def _unwrap(node: jn.Node) -> jn.Node:
    while isinstance(node, jn.Filter | jn.Test) and node.node is not None:
        node = node.node
    return node


def _is_name_in(node: jn.Node, names: set[str]) -> bool:
    node = _unwrap(node)
    if isinstance(node, jn.Getitem) and isinstance(node.arg, jn.Slice):
        node = _unwrap(node.node)
    return isinstance(node, jn.Name) and node.name in names


def _is_item_of(node: jn.Node, lists: set[str]) -> bool:
    """``messages[0]``, ``messages[-1]``, ``messages | last``: one element of a message list."""
    inner = _unwrap(node)
    if isinstance(inner, jn.Getitem) and not isinstance(inner.arg, jn.Slice):
        return _is_name_in(inner.node, lists)
    return (isinstance(node, jn.Filter) and node.name in ("first", "last")
            and node.node is not None and _is_name_in(node.node, lists))


def _is_key_of(node: jn.Node, owners: set[str], key: str) -> bool:
    node = _unwrap(node)
    if isinstance(node, jn.Getitem) and isinstance(node.arg, jn.Const) and node.arg.value == key:
        return _is_name_in(node.node, owners)
    if isinstance(node, jn.Getattr) and node.attr == key:
        return _is_name_in(node.node, owners)
    return False


def detect_content_format(source: str | None) -> ContentFormat:
    """"openai" if the template loops over a message's ``content``, else "string".

    Follows messages through ``{% set %}`` aliases (``loop_messages = messages[1:]``), single
    elements (``messages[0]``), and content aliases (``{% set c = message.content %}``).
    A template that does not parse counts as "string" (rendering will report the error).
    """
    if not source:
        return "string"
    try:
        ast = make_environment().parse(source)
    except TemplateSyntaxError:
        return "string"
    lists: set[str] = {"messages"}
    items: set[str] = set()
    contents: set[str] = set()
    for _ in range(8):  # aliases of aliases; a fixpoint is reached in a few passes
        before = (len(lists), len(items), len(contents))
        for node in ast.find_all(jn.Assign):
            if not isinstance(node.target, jn.Name):
                continue
            name = node.target.name
            if _is_name_in(node.node, lists):
                lists.add(name)
            elif _is_item_of(node.node, lists):
                items.add(name)
            elif _is_key_of(node.node, items, "content"):
                contents.add(name)
        for loop in ast.find_all(jn.For):
            if isinstance(loop.target, jn.Name) and _is_name_in(loop.iter, lists):
                items.add(loop.target.name)
        if (len(lists), len(items), len(contents)) == before:
            break
    for loop in ast.find_all(jn.For):
        if _is_key_of(loop.iter, items, "content") or _is_name_in(loop.iter, contents):
            return "openai"
    return "string"


# --------------------------------------------------------------------------------------------
# Messages → template data
# --------------------------------------------------------------------------------------------


def _part_text(part: Mapping[str, Any]) -> str:
    ptype = part.get("type")
    if ptype is None:
        ptype = "text" if "text" in part else None
    if ptype in TEXT_PART_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError(f"Content part of type '{ptype}' needs a string 'text'.")
        return text
    if ptype == "refusal":
        text = part.get("refusal", part.get("text"))
        if not isinstance(text, str):
            raise ChatTemplateError("Content part of type 'refusal' needs a string 'refusal'.")
        return text
    if ptype in MEDIA_PART_TYPES:
        raise ChatTemplateError(f"Content part type '{ptype}' is not supported: this server's "
                                "models take text only.")
    raise ChatTemplateError(f"Unknown content part type {ptype!r}; expected one of "
                            f"{sorted(TEXT_PART_TYPES | {'refusal'})}.")


def conversation_for_template(messages: Sequence[Mapping[str, Any]],
                              content_format: ContentFormat) -> list[dict[str, Any]]:
    """OpenAI messages (plain dicts) → the dicts the template sees.

    "string": list content is flattened to its text parts joined by newlines; null content is "".
    "openai": content is always a list of ``{"type": "text", "text": ...}`` parts.
    Keys whose value is None are dropped (templates test for presence); assistant tool-call
    ``arguments`` given as JSON strings are parsed into objects, as vLLM does.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        msg = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, list):
            texts = [_part_text(p) for p in content]
        elif isinstance(content, str):
            texts = [content]
        else:
            texts = []
        if content_format == "openai":
            msg["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            msg["content"] = "\n".join(texts)
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if msg.get("tool_calls"):
            msg["tool_calls"] = [_parse_tool_call(tc) for tc in msg["tool_calls"]]
        out.append(msg)
    return out


def _parse_tool_call(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatTemplateError(
                f"tool_calls[].function.arguments is not valid JSON: {e}") from e
    elif args is None:
        fn["arguments"] = {}
    return {**call, "function": fn}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def check_server_template(template: str, content_format: str = "auto") -> ContentFormat:
    """Compile the server's template (a ``ChatTemplateError`` on a syntax error) and log its
    detected content format, once, in the server process; returns the format in use."""
    detected = ChatRenderer(template).content_format or "string"
    logger.info("Detected the chat template content format to be '%s'. You can set "
                "`--chat-template-content-format` to override this.", detected)
    if content_format != "auto" and content_format != detected:
        logger.warning("--chat-template-content-format %s overrides the detected format "
                       "'%s'; rendering may differ from what the template expects.",
                       content_format, detected)
        return content_format  # type: ignore[return-value]
    return detected


class ChatRenderer:
    """Renders conversations with the server's template, or a trusted request template, in the
    calling thread (the server calls it only inside its template worker processes).

    ``special_tokens`` are the tokenizer's special-token strings (``bos_token``, ``eos_token``,
    ...), which templates read as variables. ``content_format`` is "auto", "string" or "openai";
    with "auto" the format is detected per template.
    """

    def __init__(self, template: str | None, *, content_format: str = "auto",
                 special_tokens: Mapping[str, str] | None = None,
                 render_timeout: float = DEFAULT_RENDER_TIMEOUT_S) -> None:
        self.env = make_environment()
        self.template_source = template
        if content_format not in ("auto", "string", "openai"):
            raise ValueError(f"unknown chat template content format {content_format!r}")
        self.forced_format: ContentFormat | None = (
            None if content_format == "auto" else content_format)  # type: ignore[assignment]
        self.special_tokens = dict(special_tokens or {})
        self.render_timeout = render_timeout
        self._compiled: OrderedDict[str, tuple[jinja2.Template, ContentFormat]] = OrderedDict()
        self._lock = threading.Lock()
        self.content_format: ContentFormat | None = None
        if template is not None:
            # a syntax error stops the server at startup
            self.content_format = self._compile(template)[1]

    def _compile(self, source: str) -> tuple[jinja2.Template, ContentFormat]:
        with self._lock:
            hit = self._compiled.get(source)
            if hit is not None:
                self._compiled.move_to_end(source)
                return hit
        try:
            compiled = self.env.from_string(source)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"Chat template syntax error (line {e.lineno}): {e.message}"
                                    ) from None
        fmt: ContentFormat = self.forced_format or detect_content_format(source)
        with self._lock:
            self._compiled[source] = (compiled, fmt)
            while len(self._compiled) > 32:  # request templates: keep a bounded cache
                self._compiled.popitem(last=False)
        return compiled, fmt

    def render_sync(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    documents: list[dict[str, str]] | None = None,
                    tools: list[dict[str, Any]] | None = None,
                    template_kwargs: Mapping[str, Any] | None = None,
                    template: str | None = None) -> str:
        """Render in the calling thread under the deadline; raises ``ChatTemplateError``.

        ``tools``: the request's tool definitions (``{"type": "function", "function": {...}}``)
        for templates with a tools section; None renders the conversation without them."""
        source = template if template is not None else self.template_source
        if source is None:
            raise ChatTemplateError(
                "This model has no chat template, so chat requests cannot be rendered. Start the "
                "server with `--chat-template PATH_OR_TEMPLATE` (examples ship in "
                "configs/chat_templates/), or use /v1/completions with a raw prompt.")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("Cannot set both `continue_final_message` and "
                                    "`add_generation_prompt` to True; send "
                                    "`add_generation_prompt: false` to continue the final message.")
        kwargs = dict(template_kwargs or {})
        for key in kwargs:
            if not isinstance(key, str) or not key.isidentifier():
                raise ChatTemplateError(f"chat_template_kwargs key {key!r} is not a valid name.")
            if key in RESERVED_TEMPLATE_VARS:
                raise ChatTemplateError(f"chat_template_kwargs may not set {key!r}; use the "
                                        "request field of that name instead.")
        compiled, fmt = self._compile(source)
        chat = conversation_for_template(messages, fmt)
        sentinel = ""
        if continue_final_message:
            chat, sentinel = _tag_final_message(chat)

        _deadline.at = time.monotonic() + self.render_timeout
        _deadline.budget = self.render_timeout
        try:
            rendered = compiled.render(
                **{**self.special_tokens, **kwargs},
                messages=chat, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"Chat template refused by the sandbox: {e}") from None
        except TemplateError as e:
            raise ChatTemplateError(f"Chat template error: {e}") from None
        except (OverflowError, RecursionError, MemoryError, TypeError, ValueError,
                AttributeError, KeyError, IndexError, ZeroDivisionError) as e:
            raise ChatTemplateError(f"Chat template failed to render: "
                                    f"{type(e).__name__}: {e}") from None
        finally:
            _deadline.at = None
        if sentinel:
            rendered = _cut_at_sentinel(rendered, sentinel)
        return rendered


def _tag_final_message(chat: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Append a unique tag to the final message's text; the render is cut where the tag lands."""
    # The trailing space tells whether the template trimmed the message (see _cut_at_sentinel).
    sentinel = f"<<xlaserve-continue-{uuid.uuid4().hex}>> "
    last = dict(chat[-1])
    content = last.get("content")
    if isinstance(content, list):
        parts = [dict(p) for p in content]
        for part in reversed(parts):
            if isinstance(part.get("text"), str):
                part["text"] += sentinel
                break
        else:
            raise ChatTemplateError("continue_final_message is set, but the final message has no "
                                    "text to continue.")
        last["content"] = parts
    elif isinstance(content, str):
        last["content"] = content + sentinel
    else:
        raise ChatTemplateError("continue_final_message is set, but the final message has no "
                                "content to continue.")
    return [*chat[:-1], last], sentinel


def _cut_at_sentinel(rendered: str, sentinel: str) -> str:
    loc = rendered.rfind(sentinel.strip())
    if loc < 0:
        raise ChatTemplateError("continue_final_message is set, but the chat template does not "
                                "render the final message's content, so it cannot be continued.")
    if rendered[loc:loc + len(sentinel)] == sentinel:
        return rendered[:loc]
    # The template trimmed the message (``| trim``), so the text is continued without its
    # trailing whitespace, as transformers does.
    return rendered[:loc].rstrip()
