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
- the prompt "FAIL" makes the request end with finish_reason "error".
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.engine.outputs import CompletionDelta, RequestOutput, TokenLogprob
from serving.engine.sampling_params import SamplingParams

CANNED = ("The capital of France is Paris. It is known for the Eiffel Tower, museums, cafés "
          "and long walks along the Seine.")


def load_smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer built from its GGUF (no torch needed); cached as tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    from models import assets

    cache = assets.cache_dir() / "test-tokenizers" / "smollm2-135m-instruct"
    tok_file = cache / "tokenizer.json"
    meta_file = cache / "meta.json"
    import json

    if not tok_file.exists() or not meta_file.exists():
        import gguf
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )

        path = assets.fetch("smollm2-135m-instruct")
        reader = gguf.GGUFReader(path)
        raw = {name: _field_value(field) for name, field in reader.fields.items()
               if name.startswith("tokenizer.") or name == "general.architecture"}
        tokenizer_dict = {new: raw[f"tokenizer.{old}"]
                          for old, new in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                          if f"tokenizer.{old}" in raw}
        backend, _ = convert_gguf_tokenizer(raw["general.architecture"], tokenizer_dict)
        cache.mkdir(parents=True, exist_ok=True)
        backend.save(str(tok_file))
        tokens = tokenizer_dict["tokens"]

        def token(key: str) -> str | None:
            i = raw.get(f"tokenizer.ggml.{key}")
            return None if i is None else tokens[i]

        meta = {"chat_template": raw.get("tokenizer.chat_template"), "bos": token("bos_token_id"),
                "eos": token("eos_token_id"), "unk": token("unknown_token_id"),
                "pad": token("padding_token_id")}
        meta_file.write_text(json.dumps(meta))
    meta = json.loads(meta_file.read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token=meta["bos"],
                                   eos_token=meta["eos"], unk_token=meta["unk"],
                                   pad_token=meta["pad"], chat_template=meta["chat_template"],
                                   add_bos_token=False)


def _field_value(field: Any) -> Any:
    import gguf

    types = field.types
    if types and types[0] == gguf.GGUFValueType.ARRAY:
        if types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types and types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


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


class FakeEngineClient:
    def __init__(self, *, max_model_len: int = 2048, step_delay: float | None = None,
                 generation_defaults: dict[str, Any] | None = None,
                 chat_template: str | None = "model") -> None:
        self.tokenizer = load_smollm2_tokenizer()
        if chat_template != "model":
            self.tokenizer.chat_template = chat_template
        self.model_name = "fake-smollm2"
        self.max_model_len = max_model_len
        self.vocab_size = len(self.tokenizer)
        self.generation_defaults = dict(generation_defaults or {})
        self.step_delay = (float(os.environ.get("XLASERVE_FAKE_STEP_S", "0.002"))
                           if step_delay is None else step_delay)
        self.canned = self.tokenizer.encode(CANNED, add_special_tokens=False)
        self.eos = self.tokenizer.eos_token_id
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

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        params.validate(self.vocab_size)
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
            limit = params.max_tokens or (self.max_model_len - len(prompt_token_ids))
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
                    if prompt_text.endswith("FAIL"):
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


def tokenizer_dir() -> Path:
    from models import assets

    return assets.cache_dir() / "test-tokenizers" / "smollm2-135m-instruct"
