"""Tool calling: parsers with vLLM's names (``--tool-call-parser``) and ``tool_choice``.

Importing the package registers every parser: ``hermes``, ``llama3_json``, ``mistral``,
``pythonic``, ``qwen3_xml``.
"""

from serving.api.tool_parsers import hermes, llama3_json, mistral, pythonic, qwen3_xml
from serving.api.tool_parsers.base import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    FunctionCall,
    ToolCall,
    ToolParser,
    get_tool_parser,
    load_tool_parser_plugin,
    make_tool_call_id,
    register_tool_parser,
    tool_parser_names,
)

__all__ = [
    "DeltaFunctionCall",
    "DeltaMessage",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "FunctionCall",
    "ToolCall",
    "ToolParser",
    "get_tool_parser",
    "hermes",
    "llama3_json",
    "load_tool_parser_plugin",
    "make_tool_call_id",
    "mistral",
    "pythonic",
    "qwen3_xml",
    "register_tool_parser",
    "tool_parser_names",
]
