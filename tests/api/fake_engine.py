"""A small deterministic engine client, for the HTTP layer's shaping and validation tests ONLY.

It satisfies ``serving.api.engine_protocol.EngineClient`` with the real SmolLM2 tokenizer, but
"generates" a fixed text instead of running a model, so response shapes, SSE framing, logprob
formats, error paths and disconnect handling can be checked in seconds and exactly. Everything
about generation quality is tested against the real engine in ``tests/api/test_e2e_*.py``.

Behaviour (per choice j of a request):
- output tokens are ``CANNED`` (tokenized), starting at token offset j; then EOS, which finishes
  with "stop" unless ``ignore_eos`` (the text then repeats);
- ``max_tokens`` → "length"; stop strings → "stop" with ``stop_reason`` the string (cut unless
  ``include_stop_str_in_output``); ``stop_token_ids`` → "stop" with the id;
- logprobs: the chosen token has logprob -0.25 and rank 1; alternatives are the next 20 ids;
- one token per step, with ``step_delay`` seconds between steps (``XLASERVE_FAKE_STEP_S``);
- a prompt ending in "FAIL" makes the request end with finish_reason "error"; one ending in
  "CRASH" also marks the engine dead (``is_healthy()`` False), as a crashed engine loop would.

With ``record`` (a path; ``XLASERVE_FAKE_RECORD`` in ``tests.api.fake_server``) every request
that reaches ``generate`` is appended to that file as one JSON line: request id, prompt token
ids, every ``SamplingParams`` field and the keyword arguments (``cache_salt``), so that a test
can see exactly what the HTTP layer handed to the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.engine.input_processor import InputProcessor, ModelFacts
from serving.engine.outputs import CompletionDelta, RequestOutput, TokenLogprob
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import SamplingParams
from serving.engine.structured_output import CompiledGrammar, GrammarBackend

CANNED = ("The capital of France is Paris. It is known for the Eiffel Tower, museums, cafés "
          "and long walks along the Seine.")


def load_gguf_tokenizer(alias: str) -> Any:
    """The tokenizer of a GGUF model asset, built by the project's loader (cached)."""
    from models import assets
    from models.gguf import read_header
    from models.tokenizer import tokenizer_from_gguf

    header = read_header(assets.fetch(alias))
    return tokenizer_from_gguf(header.metadata, cache_key=header.header_sha256, progress=False)


def load_smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer (byte-level BPE, ChatML template; adds no special tokens)."""
    return load_gguf_tokenizer("smollm2-135m-instruct")


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 1024
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0
    num_recompiles: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    kv_pages_cached: int = 0
    num_aborted: int = 0
    num_failed_steps: int = 0
    kv_leaks_detected: int = 0


class FakeEngineClient:
    def __init__(self, *, max_model_len: int = 2048, step_delay: float | None = None,
                 generation_defaults: dict[str, Any] | None = None,
                 chat_template: str | None = "model", tokenizer: str = "smollm2-135m-instruct",
                 record: Path | None = None) -> None:
        self.tokenizer = load_gguf_tokenizer(tokenizer)
        if chat_template != "model":
            self.tokenizer.chat_template = chat_template
        self.record = record
        self.model_name = "fake-smollm2"
        self.max_model_len = max_model_len
        self.max_num_seqs = 32
        self.vocab_size = len(self.tokenizer)
        self.generation_defaults = dict(generation_defaults or {})
        self.step_delay = (float(os.environ.get("XLASERVE_FAKE_STEP_S", "0.002"))
                           if step_delay is None else step_delay)
        self.canned = self.tokenizer.encode(CANNED, add_special_tokens=False)
        self.eos = self.tokenizer.eos_token_id
        # The real engine's validation, on this fake's model facts: what reaches ``generate``
        # is exactly what the real engine would accept.
        self.processor = InputProcessor(ModelFacts(
            vocab_size=self.vocab_size, max_model_len=max_model_len, page_size=16,
            usable_pages=1 << 20, eos_ids=frozenset({self.eos}), tasks=("generate",),
            max_tokens_cap=self.generation_defaults.get("max_tokens")), self.tokenizer)
        # The real grammar backend: requests with grammars are compiled and validated as the
        # real server does them (the canned output ignores the grammar).
        self.grammars = GrammarBackend.from_hf_tokenizer(self.tokenizer, [self.eos],
                                                         self.vocab_size)
        self._stats = FakeStats()
        self._running: dict[str, int] = {}
        self._healthy = True
        self.started = False

    @classmethod
    def from_env(cls) -> FakeEngineClient:
        return cls()

    async def start(self) -> None:
        self.started = True

    def is_healthy(self) -> bool:
        return self._healthy

    def stats(self) -> FakeStats:
        s = self._stats
        s.num_running = len(self._running)
        s.kv_pages_used = sum(self._running.values())
        return s

    async def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    async def shutdown(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._running.clear()

    def _logprob(self, token_id: int) -> TokenLogprob:
        top = [(token_id, -0.25)] + [((token_id + k) % self.vocab_size, -1.0 - k)
                                     for k in range(1, 20)]
        return TokenLogprob(token_id=token_id, logprob=-0.25, rank=1, top=top)

    def _record(self, spec: EngineRequest) -> None:
        if self.record is None:
            return
        assert spec.sampling is not None
        entry = {"request_id": spec.request_id, "prompt_token_ids": list(spec.prompt_ids),
                 "params": dataclasses.asdict(spec.sampling), "max_tokens": spec.max_tokens,
                 "kwargs": {"cache_salt": spec.cache_salt or None}}
        with self.record.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, *, cache_salt: str | None = None,
                     grammar: CompiledGrammar | None = None) -> EngineRequest:
        return self.processor.sampling_request(request_id, prompt_token_ids, params,
                                               cache_salt=cache_salt, grammar=grammar)

    async def generate(self, spec: EngineRequest) -> AsyncIterator[RequestOutput]:
        self._record(spec)
        request_id, params = spec.request_id, spec.sampling
        assert params is not None
        prompt_token_ids = list(spec.prompt_ids)
        prompt_text = self.tokenizer.decode(prompt_token_ids)
        pages = (len(prompt_token_ids) + 15) // 16
        self._running[request_id] = pages
        self._stats.prompt_tokens_total += len(prompt_token_ids)
        try:
            prompt_lps = None
            if params.prompt_logprobs is not None:
                prompt_lps = [None] + [self._logprob(t) for t in prompt_token_ids[1:]]
            n = params.n
            ids: list[list[int]] = [[] for _ in range(n)]
            texts = [""] * n
            done = [False] * n
            first = True
            limit = spec.max_tokens
            step = 0
            while not all(done):
                await asyncio.sleep(self.step_delay)
                if request_id not in self._running:
                    return  # aborted
                self._stats.num_steps += 1
                deltas = []
                for j in range(n):
                    if done[j]:
                        continue
                    if prompt_text.endswith("CRASH"):
                        self._healthy = False
                    if prompt_text.endswith(("FAIL", "CRASH")):
                        done[j] = True
                        deltas.append(CompletionDelta(index=j, token_ids=[], text="",
                                                      finish_reason="error"))
                        continue
                    pos = j + step
                    cycle = len(self.canned) + 1
                    tok = self.canned[pos % cycle] if pos % cycle < len(self.canned) else self.eos
                    if tok == self.eos and params.ignore_eos:
                        tok = self.canned[0]
                    ids[j].append(tok)
                    self._stats.generation_tokens_total += 1
                    finish: str | None = None
                    stop_reason: int | str | None = None
                    new_text = ""
                    if tok == self.eos and len(ids[j]) > params.min_tokens:
                        finish = "stop"
                    elif tok in params.stop_token_ids:
                        finish, stop_reason = "stop", tok
                    else:
                        full = self.tokenizer.decode(ids[j], skip_special_tokens=True)
                        new_text = full[len(texts[j]):]
                        for s in params.stop:
                            at = full.find(s, max(0, len(texts[j]) - len(s)))
                            if at >= 0:
                                end = at + len(s) if params.include_stop_str_in_output else at
                                new_text = full[len(texts[j]):end]
                                finish, stop_reason = "stop", s
                                break
                    if finish is None and len(ids[j]) >= limit:
                        finish = "length"
                    texts[j] += new_text
                    done[j] = finish is not None
                    deltas.append(CompletionDelta(
                        index=j, token_ids=[tok], text=new_text,
                        logprobs=[self._logprob(tok)] if params.logprobs is not None else None,
                        finish_reason=finish, stop_reason=stop_reason,
                        num_generated=len(ids[j])))
                step += 1
                error = "fake engine failure" if any(
                    d.finish_reason == "error" for d in deltas) else None
                yield RequestOutput(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                    outputs=deltas, finished=all(done),
                                    prompt_logprobs=prompt_lps if first else None,
                                    error=error)
                first = False
        finally:
            self._running.pop(request_id, None)
