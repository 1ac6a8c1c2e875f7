"""Chat templates: loading, content-format detection, HF parity, and the sandbox (no server)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.api.chat_template import (
    ChatRenderer,
    ChatTemplateError,
    check_server_template,
    conversation_for_template,
    detect_content_format,
    load_chat_template,
)
from serving.api.template_worker import TemplateWorkers
from tests.api.fake_engine import load_smollm2_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "configs" / "chat_templates"

STRING_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# One C call (list.sort) of minutes, in constant memory: the in-sandbox deadline never runs.
SORT_BOMB = ("{% set a = 'a' * 400000 %}"
             "{{ ([a ~ 'b', a ~ 'c'] * 500000) | sort(case_sensitive=true) | length }}")
LIST_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{% for part in m.content %}"
                 "{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}\n"
                 "{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2_tokenizer()


def test_load_chat_template_path_inline_and_bad_path(tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(f)) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{{ 'x' }}") == "{{ 'x' }}"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("source, expected", [
    (STRING_TEMPLATE, "string"),
    (LIST_TEMPLATE, "openai"),
    # aliases: loop over a slice assigned to a new name, content through a variable
    ("{% set loop_messages = messages[1:] %}{% for message in loop_messages %}"
     "{% set c = message['content'] %}{% for p in c %}{{ p['text'] }}{% endfor %}{% endfor %}",
     "openai"),
    ("{% set first = messages[0] %}{% for p in first.content %}{{ p.text }}{% endfor %}",
     "openai"),
    ("{% for message in messages %}{% if message.content is string %}{{ message.content }}"
     "{% endif %}{% endfor %}", "string"),
    ("{% for x in [1, 2] %}{{ x }}{% endfor %}", "string"),
    ("{% for %}", "string"),  # does not parse: rendering reports the error later
    (None, "string"),
])
def test_detect_content_format(source: str | None, expected: str) -> None:
    assert detect_content_format(source) == expected


def test_detection_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="xlaserve.api"):
        assert check_server_template(LIST_TEMPLATE) == "openai"
        assert check_server_template(STRING_TEMPLATE) == "string"
        assert check_server_template(LIST_TEMPLATE, "string") == "string"
    lines = [r.getMessage() for r in caplog.records]
    assert any("Detected the chat template content format to be 'openai'" in m for m in lines)
    assert any("Detected the chat template content format to be 'string'" in m for m in lines)
    assert any("--chat-template-content-format string overrides" in m for m in lines)


def test_forced_format_overrides_detection() -> None:
    r = ChatRenderer(LIST_TEMPLATE, content_format="string")
    assert r.content_format == "string"
    # A list template fed strings iterates over characters: the override is honoured as asked.
    assert r.render_sync([{"role": "user", "content": "ab"}], add_generation_prompt=False) \
        == "<|user|>"


def test_content_conversion() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "input_text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "1", "type": "function",
                 "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}]
    s = conversation_for_template(msgs, "string")
    assert s[0]["content"] == "a\nb" and s[1]["content"] == ""
    assert s[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    o = conversation_for_template(msgs, "openai")
    assert o[0]["content"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        conversation_for_template([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}], "string")
    with pytest.raises(ChatTemplateError, match="Unknown content part type"):
        conversation_for_template([{"role": "user", "content": [{"type": "bogus"}]}], "string")


@pytest.mark.parametrize("messages, add_generation_prompt, continue_final", [
    ([{"role": "user", "content": "What is the capital of France?"}], True, False),
    ([{"role": "user", "content": "What is the capital of France?"}], False, False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How"}], False, True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Again"}], True, False),
])
def test_render_matches_transformers(tokenizer, messages, add_generation_prompt,
                                     continue_final) -> None:
    """The server's renderer equals HF ``apply_chat_template`` on the model's own template."""
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    r = ChatRenderer(tokenizer.chat_template, special_tokens=special)
    ours = r.render_sync(messages, add_generation_prompt=add_generation_prompt,
                         continue_final_message=continue_final)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final)
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(p.name for p in TEMPLATES.glob("*.jinja")))
def test_shipped_templates_render(name: str) -> None:
    source = (TEMPLATES / name).read_text()
    r = ChatRenderer(source, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    out = r.render_sync([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}],
                        add_generation_prompt=True)
    for text in ("S", "U", "A", "V"):
        assert text in out
    cont = r.render_sync([{"role": "user", "content": "U"},
                          {"role": "assistant", "content": "Partial answer"}],
                         add_generation_prompt=False, continue_final_message=True)
    assert cont.endswith("Partial answer")


def test_tojson_does_not_html_escape() -> None:
    r = ChatRenderer("{{ messages[0] | tojson }}")
    assert r.render_sync([{"role": "user", "content": "<b>&'"}]) == \
        '{"role": "user", "content": "<b>&\'"}'


def test_generation_tag_and_loopcontrols() -> None:
    r = ChatRenderer("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                     "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    assert r.render_sync([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) \
        == "a"


def test_raise_exception_is_a_client_error() -> None:
    r = ChatRenderer("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        r.render_sync([{"role": "user", "content": "x"}])


def test_both_generation_flags_refused() -> None:
    r = ChatRenderer(STRING_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="continue_final_message"):
        r.render_sync([{"role": "user", "content": "x"}], add_generation_prompt=True,
                      continue_final_message=True)


def test_no_template_message_says_how_to_fix() -> None:
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        ChatRenderer(None).render_sync([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("key", ["messages", "add_generation_prompt", "tokenize", "tools"])
def test_reserved_kwargs_refused(key: str) -> None:
    with pytest.raises(ChatTemplateError, match=key):
        ChatRenderer(STRING_TEMPLATE).render_sync([{"role": "user", "content": "x"}],
                                                  template_kwargs={key: 1})


def test_kwargs_reach_the_template() -> None:
    r = ChatRenderer("{% if enable_thinking %}T{% else %}F{% endif %}")
    assert r.render_sync([{"role": "user", "content": "x"}],
                         template_kwargs={"enable_thinking": True}) == "T"


@pytest.mark.parametrize("payload", [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ ''.__class__.__base__ }}",
    "{{ messages.__class__.__init__.__globals__['os'].system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ (messages|attr('__class__')).__init__.__globals__['os'].system('touch MARKER') }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ namespace.__init__.__globals__['os'].system('touch MARKER') }}",
    "{{ raise_exception.__globals__['os'].system('touch MARKER') }}",
])
def test_sandbox_refuses_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 payload: str) -> None:
    """``__class__``, ``__globals__`` and ``os`` are out of reach; nothing runs."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    r = ChatRenderer(payload.replace("MARKER", str(marker)))
    try:
        out = r.render_sync([{"role": "user", "content": "x"}])
    except ChatTemplateError as e:
        assert "Traceback" not in str(e)
    else:
        # The sandbox renders an unsafe attribute as empty when nothing more is done with it.
        assert "class" not in out and "function" not in out
    assert not marker.exists()


def test_sandbox_bounds_sequences_and_powers() -> None:
    with pytest.raises(ChatTemplateError, match="sandbox"):
        ChatRenderer("{{ 'a' * 10**9 }}").render_sync([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="sandbox"):
        ChatRenderer("{{ 7 ** 100000 }}").render_sync([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="range"):
        ChatRenderer("{% for i in range(10**9) %}{% endfor %}").render_sync(
            [{"role": "user", "content": "x"}])


def test_render_time_limit_and_event_loop_stays_free() -> None:
    """Both deadlines in the worker pool: the sandbox's (the worker lives on) and the kill (one
    long C call the sandbox cannot interrupt: sorting a million long strings that differ only
    at their ends takes minutes)."""
    slow = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
            "{% endfor %}")

    async def main() -> tuple[int, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        pool = await TemplateWorkers.start(STRING_TEMPLATE, render_timeout=0.5, workers=1)
        t = asyncio.create_task(ticker())
        try:
            with pytest.raises(ChatTemplateError, match="time limit"):
                await pool.render([{"role": "user", "content": "x"}], template=slow)
            assert pool.kills == 0
            with pytest.raises(ChatTemplateError, match="renderer was stopped"):
                await pool.render([{"role": "user", "content": "x"}], template=SORT_BOMB)
            assert pool.kills == 1
            # a fresh worker took the killed one's place
            assert await pool.render([{"role": "user", "content": "x"}]) == \
                "<|user|>x\n<|assistant|>"
        finally:
            t.cancel()
            await pool.close()
        return ticks, pool.kills

    # The loop kept running while the templates spun in the worker process.
    ticks, kills = asyncio.run(main())
    assert ticks > 50 and kills == 1


def test_worker_pool_survives_cancellation_and_a_dead_worker() -> None:
    msg = [{"role": "user", "content": "x"}]

    async def main() -> None:
        pool = await TemplateWorkers.start(STRING_TEMPLATE, render_timeout=0.5, workers=1)
        try:
            task = asyncio.create_task(pool.render(msg, template=SORT_BOMB))
            await asyncio.sleep(0.2)
            task.cancel()  # the client hung up: the render runs on until killed
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):
                if pool.kills:
                    break
                await asyncio.sleep(0.05)
            assert pool.kills == 1
            # the slot came back (with a fresh worker), not lost with the cancelled caller
            assert await pool.render(msg, add_generation_prompt=False) == "<|user|>x\n"
            (worker,) = pool._all
            os.kill(worker.proc.pid, signal.SIGKILL)  # dies on its own (the OOM killer, say)
            # If the death was already seen (the process reaped), the pool replaces the worker
            # before using it; if not, that one render fails cleanly. Either way, the next works.
            try:
                await pool.render(msg)
            except ChatTemplateError as e:
                assert "worker stopped" in str(e)
            assert await pool.render(msg, add_generation_prompt=False) == "<|user|>x\n"
        finally:
            await pool.close()

    asyncio.run(main())


def test_workers_die_with_the_server(tmp_path: Path) -> None:
    """A server killed while a worker is stuck in a long C call leaves no worker behind."""
    script = tmp_path / "server.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from serving.api.template_worker import TemplateWorkers\n"
        "from tests.api.test_chat_template import SORT_BOMB\n"
        "async def main():\n"
        "    pool = await TemplateWorkers.start(None, render_timeout=60, workers=1)\n"
        "    task = asyncio.create_task(pool.render([], template=SORT_BOMB))\n"
        "    await asyncio.sleep(0.5)\n"
        "    print(*(w.proc.pid for w in pool._all), flush=True)\n"
        "    os._exit(0)  # no cleanup, as under SIGKILL\n"
        "asyncio.run(main())\n")
    # stderr, which the worker inherits, must not be a pipe run() waits on
    out = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    (pid,) = [int(x) for x in out.stdout.split()]
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the template worker outlived its server")
