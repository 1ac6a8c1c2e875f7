"""serving/api/tool_parsers/json_stream.py: canonical JSON from growing prefixes."""

from __future__ import annotations

import json

import pytest

from serving.api.tool_parsers.json_stream import scan_call_object, scan_json

TEXTS = [
    '{"a":1,"b":[true,false,null],"c":{"d":"e"}}',
    ' { "x" : -0 , "y" : 1.50, "z": 1e5, "w": 12345678901234567890, "v": -2.5E-3 } ',
    '{"s": "tab\\there \\"q\\" \\\\ \\/ \\u00e9 \\ud83d\\ude00 é 東京 \\u0001 \\n"}',
    '[1, [2, [3, {}]], [], ""]',
    '"just a string"',
    "42",
    '{"dup": 1, "dup": 2}',
]


@pytest.mark.parametrize("text", TEXTS)
def test_whole_text_is_json_dumps(text: str) -> None:
    scan = scan_json(text, final=True)
    assert not scan.error and scan.end == len(text.rstrip())
    if "dup" not in text:
        assert scan.text == json.dumps(json.loads(text), ensure_ascii=False)
    else:  # duplicate keys are kept as written
        assert scan.text == '{"dup": 1, "dup": 2}'


@pytest.mark.parametrize("text", TEXTS)
def test_every_prefix_gives_a_prefix(text: str) -> None:
    whole = scan_json(text, final=True).text
    previous = ""
    for k in range(len(text)):
        part = scan_json(text[:k])
        assert not part.error, text[:k]
        assert whole.startswith(part.text) and part.text.startswith(previous), text[:k]
        previous = part.text
    # Without final, a number that reaches the end of the text may still grow.
    assert scan_json("12").end is None and scan_json("12", final=True).text == "12"


@pytest.mark.parametrize("text", ['{"a" 1}', "[1,]", '{"a": tru]', '{"a": "\x01"}', "{1: 2}",
                                  '{"a": 01}', "nul!", '"\\x"', '"\\u12g4"'])
def test_invalid(text: str) -> None:
    scan = scan_json(text, final=True)
    assert scan.error or scan.end is None


def test_call_object() -> None:
    text = '{"name": "f", "other": [1, {"x": "}"}], "arguments": {"a": [1,2]}}'
    c = scan_call_object(text, 0, final=True)
    assert (c.name, c.arguments, c.end, c.error) == ("f", '{"a": [1, 2]}', len(text), False)
    assert scan_call_object('{"name": "g"}', 0, True).arguments == "{}"
    partial = scan_call_object('{"arguments": {"a": "xy', 0, False)
    assert (partial.name, partial.arguments, partial.end) == (None, '{"a": "xy', None)
    assert scan_call_object('{"arguments": {}}', 0, True).error  # a call needs a name
    assert scan_call_object('{"name": 3}', 0, True).error
