"""Tool-call parsers: the model's text → OpenAI ``tool_calls``, whole or as stream deltas.

vLLM's contract (``--tool-call-parser`` with ``tool_choice: "auto"``): ``extract_tool_calls``
takes the whole output and returns whether tools were called, the calls, and the content left
over; ``extract_tool_calls_streaming`` takes the text so far after each step and returns the
delta to send (content, or ``tool_calls[i]`` pieces: first the id, type and name, then argument
fragments), or None to hold the step back; ``finish_streaming`` flushes what only the end of the
output can complete (a trailing number, held-back marker prefixes).

Every parser here is written as one function, ``_parse(text, final)``, that reads the whole text
so far into content plus calls whose ``arguments`` are canonical JSON of what is complete. The
base class turns successive parses into deltas by sending only what is new, so for a well-formed
output the streamed content and argument fragments concatenate to exactly the non-streamed
content and arguments. A parser instance serves one choice of one request (streaming state).
"""

from __future__ import annotations

import importlib.util
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.api.registry import Registry

_ALPHANUMERIC = string.ascii_letters + string.digits


def make_tool_call_id() -> str:
    """vLLM's id: ``chatcmpl-tool-`` and 32 random hex digits."""
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


def make_mistral_tool_call_id() -> str:
    """Mistral's tokenizers accept only 9 alphanumeric characters as an id."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"


@dataclass(frozen=True)
class ExtractedToolCalls:
    """A whole output: ``content`` is the text outside the calls (None when there is none)."""

    tools_called: bool
    tool_calls: tuple[ToolCall, ...]
    content: str | None


@dataclass(frozen=True)
class DeltaFunctionCall:
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True)
class DeltaToolCall:
    """One piece of call ``index``: the first carries ``id``, ``type`` and the name."""

    index: int
    function: DeltaFunctionCall
    id: str | None = None
    type: str | None = None


@dataclass(frozen=True)
class DeltaMessage:
    content: str | None = None
    tool_calls: tuple[DeltaToolCall, ...] = ()


@dataclass(frozen=True)
class PartialCall:
    """A call as far as it has been read: ``name`` once it is complete; ``arguments``: the
    canonical JSON text of what is complete, which only grows; ``complete``: the call ended."""

    name: str | None
    arguments: str = ""
    complete: bool = False


@dataclass(frozen=True)
class Parsed:
    """``content``: the text outside calls that is safe to send (a possible marker prefix at
    the end is held back unless ``final``); ``ok``: False once the text cannot be a valid
    output of this format (then ``extract_tool_calls`` returns the whole text as content)."""

    content: str
    calls: tuple[PartialCall, ...] = ()
    ok: bool = True


@dataclass
class _Sent:
    id: str
    arguments: int = 0  # characters of arguments already sent


@dataclass
class _StreamState:
    content: int = 0  # characters of content already sent
    calls: list[_Sent] = field(default_factory=list)


class ToolParser(ABC):
    """Base of every tool parser. ``tools``: the request's tool definitions
    (``{"type": "function", "function": {"name", "parameters"}}``), which some formats need to
    type the argument values."""

    def __init__(self, tokenizer: Any = None, tools: Sequence[Mapping[str, Any]] = ()) -> None:
        self.tokenizer = tokenizer
        self.tools = tuple(tools)
        self._stream = _StreamState()

    @abstractmethod
    def _parse(self, text: str, final: bool) -> Parsed:
        """Content and calls of ``text``; the same text with ``final=False`` must give a content
        and arguments that are prefixes of those with ``final=True``."""

    def new_tool_call_id(self) -> str:
        return make_tool_call_id()

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """The calls in a whole output. Not a valid output of the format, or no calls: no tools
        called, and the whole text is the content (vLLM's fallback)."""
        p = self._parse(text, final=True)
        calls = [c for c in p.calls if c.name is not None and c.complete]
        if not p.ok or not calls or len(calls) != len(p.calls):
            return ExtractedToolCalls(False, (), text)
        tool_calls = tuple(ToolCall(self.new_tool_call_id(), FunctionCall(str(c.name),
                                                                           c.arguments))
                           for c in calls)
        return ExtractedToolCalls(True, tool_calls, p.content or None)

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int] = (),
        current_token_ids: Sequence[int] = (),
        delta_token_ids: Sequence[int] = (),
    ) -> DeltaMessage | None:
        """The delta to send after a step whose output so far is ``current_text``; None to
        send nothing this step. (vLLM's signature; these formats need only the text.)"""
        return self._delta(self._parse(current_text, final=False))

    def finish_streaming(self, text: str) -> DeltaMessage | None:
        """After the last step: what the end of the output completes (the final fragment).

        An output that turns out to hold no valid call, while no call was streamed yet, ends as
        content (the rest of the text), as ``extract_tool_calls`` answers it; calls already
        streamed cannot be taken back, so a malformed output after them just stops."""
        p = self._parse(text, final=True)
        complete = p.ok and p.calls and all(c.name is not None and c.complete for c in p.calls)
        if not complete and not self._stream.calls:
            p = Parsed(text)
        return self._delta(p)

    @property
    def streamed_tool_calls(self) -> int:
        """How many calls the stream has started (``finish_reason`` is "tool_calls" if any)."""
        return len(self._stream.calls)

    def _delta(self, p: Parsed) -> DeltaMessage | None:
        st = self._stream
        content = p.content[st.content:]
        st.content = max(st.content, len(p.content))
        pieces: list[DeltaToolCall] = []
        # A malformed output stops the call deltas where it went wrong.
        for i, call in enumerate(p.calls if p.ok else ()):
            if call.name is None:
                break  # a call is announced by its name; arguments wait for it
            if i == len(st.calls):
                st.calls.append(_Sent(self.new_tool_call_id(), len(call.arguments)))
                pieces.append(DeltaToolCall(i, DeltaFunctionCall(call.name,
                                                                 call.arguments or None),
                                            id=st.calls[i].id, type="function"))
                continue
            sent = st.calls[i]
            if len(call.arguments) > sent.arguments:
                pieces.append(DeltaToolCall(i, DeltaFunctionCall(
                    arguments=call.arguments[sent.arguments:])))
                sent.arguments = len(call.arguments)
        if not content and not pieces:
            return None
        return DeltaMessage(content=content or None, tool_calls=tuple(pieces))


def holdback(text: str, markers: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of one of ``markers``
    (they are held back from the content until the next step says)."""
    longest = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:k]):
                longest = k
                break
    return longest


_PARSERS: Registry[ToolParser] = Registry("tool call parser")
_PLUGINS: set[Path] = set()  # plugin files loaded
register_tool_parser = _PARSERS.register  # class decorator
get_tool_parser = _PARSERS.get
tool_parser_names = _PARSERS.names


def load_tool_parser_plugin(path: str) -> None:
    """``--tool-parser-plugin PATH``: run a Python file whose parsers register themselves with
    ``@register_tool_parser(NAME)``, so that ``--tool-call-parser NAME`` finds them. Raises
    ``ValueError`` when the file is missing or fails to import. A file already loaded is not
    run again (the command line and a ``--config`` file may both name it)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"tool parser plugin not found: {file}")
    if file.resolve() in _PLUGINS:
        return
    spec = importlib.util.spec_from_file_location(f"xlaserve_tool_plugin_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise ValueError(f"tool parser plugin is not a Python module: {file}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"tool parser plugin {file} failed to load: "
                         f"{type(e).__name__}: {e}") from e
    _PLUGINS.add(file.resolve())
