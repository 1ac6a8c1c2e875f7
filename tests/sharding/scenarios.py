"""Sharding checks that run inside a process with 8 simulated CPU devices.

The device count is fixed when JAX starts, so ``test_sharding.py`` runs these functions in a
worker process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see
``conftest.py``), and the multi-host test starts ``multihost_main`` processes. Each function
asserts, and returns something small for the test to report.
"""

from __future__ import annotations

import asyncio
import math
import random
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.registry import LoadedModel
from models.testing import tiny_loaded
from serving.engine.config import EngineArgs
from serving.engine.engine import LLMEngine
from serving.engine.llm import LLM
from serving.engine.sampler import Sampling, SamplingFlags, sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.sharded import shard_loaded
from sharding.mesh import MeshShape, make_mesh
from sharding.sharder import Sharder
from tests.utils import single_seq_inputs

# The tiny model with 8 query heads over 2 kv heads: tp=4 and tp=8 replicate kv heads. Vocab and
# mlp are chosen to divide by 8 so every rule actually shards at every tp.
# Two layers (one sliding, one global for Gemma) halve compile time against the default three.
TINY: dict[str, Any] = dict(num_heads=8, num_kv_heads=2, vocab_size=264, intermediate_size=96,
                            num_layers=2)
LAYERS = 2
# Two token buckets (8, 16) keep compile time down on a 2-core machine.
ENGINE_KW: dict[str, Any] = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16,
                                 token_buckets=(8,), block_size=16, compilation_cache=False)
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(256) for _ in range(n)] for n in (5, 13, 29, 40)]
MAX_TOKENS = 12
LOGIT_ATOL = 1e-4  # f32: tp changes only the order of the all-reduced partial sums
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=7, max_tokens=8,
                         ignore_eos=True, logprobs=3)
# Penalties read the runner's device-resident token history (replicated on the mesh).
PENALISED = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                           frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3)

_cache: dict[Any, Any] = {}


def tiny(**kw: Any) -> LoadedModel:
    if kw.get("model_type") == "gemma3_text":
        kw = {"sliding_layers": (True, False), **kw}
    return tiny_loaded(**{**TINY, **kw})


def sharder(tp: int) -> Sharder:
    return Sharder(make_mesh(MeshShape(1, tp)))


def engine(tp: int, loaded: LoadedModel | None = None, **kw: Any) -> LLMEngine:
    args = EngineArgs(**{**ENGINE_KW, **kw}, tensor_parallel_size=tp)
    return LLMEngine(args, loaded=loaded if loaded is not None else tiny())


def greedy(eng: LLMEngine, prompts: list[list[int]], max_tokens: int = MAX_TOKENS
           ) -> list[list[int]]:
    """Greedy continuations of ``prompts``, all in flight together."""
    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [toks for toks, _ in run(eng, [(pr, p) for pr in prompts])]


def run(eng: LLMEngine, reqs: list[tuple[list[int], SamplingParams]]
        ) -> list[tuple[list[int], list[float]]]:
    """(tokens, sampled-token logprobs) per request, all in flight together."""
    outs = LLM.from_engine(eng).generate([pr for pr, _ in reqs], [p for _, p in reqs],
                                         use_tqdm=False)
    return [(r.outputs[0].token_ids, [x.logprob for x in r.outputs[0].logprobs or []])
            for r in outs]


def prefill_logits(loaded: LoadedModel, sh: Sharder | None, tokens: list[int]) -> np.ndarray:
    """f32[T, V] logits of one prefill through the (sharded) model, outside the engine."""
    cfg, ps = loaded.config, 16
    pages = list(range(1, 1 + math.ceil(len(tokens) / ps)))
    shape = (cfg.num_kv_heads, len(pages) + 1, ps, cfg.head_dim)

    def zeros() -> jax.Array:
        return jnp.zeros(shape, loaded.dtype) if sh is None else sh.zeros_kv(shape, loaded.dtype)

    kv = [(zeros(), zeros()) for _ in range(cfg.num_layers)]
    inp: Any = single_seq_inputs(tokens, 0, pages, ps, len(pages))
    if sh is not None:
        inp = sh.put_inputs(inp)
    graphdef, state = nnx.split(loaded.model)

    def fwd(state: Any, kv: Any, inp: Any) -> jax.Array:
        m: Any = nnx.merge(graphdef, state)
        h, _ = m(kv, inp)
        return m.logits(h)

    return np.asarray(jax.jit(fwd)(state, kv, inp))


def init_worker(compilation_cache_dir: str | None = None) -> int:
    """First call in the worker: a private persistent compilation cache lets engines with the
    same mesh and shapes (tp=4, dp replicas, the orbax engine) share compiled steps."""
    if compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax.device_count()


# ---- tensor parallel vs tp=1 ---------------------------------------------------------------------
def _reference(family: str) -> dict[str, Any]:
    if family not in _cache:
        loaded = tiny(model_type=family)
        eng = engine(1, loaded)
        _cache[family] = {
            "greedy": greedy(eng, PROMPTS),
            "sampled": run(eng, [(PROMPTS[1], SAMPLED)])[0],
            "penalised": run(eng, [(pr, PENALISED) for pr in PROMPTS]),
            "logits": prefill_logits(loaded, None, PROMPTS[3]),
        }
    ref: dict[str, Any] = _cache[family]
    return ref


def check_tp(tp: int, family: str = "llama") -> dict[str, Any]:
    """Greedy tokens identical to tp=1, seeded sampling identical, penalised greedy identical,
    logits within tolerance."""
    ref = _reference(family)
    eng = engine(tp, tiny(model_type=family))
    assert eng.sharder is not None and eng.sharder.tp == tp
    assert greedy(eng, PROMPTS) == ref["greedy"]
    toks, lps = run(eng, [(PROMPTS[1], SAMPLED)])[0]
    assert toks == ref["sampled"][0]
    np.testing.assert_allclose(lps, ref["sampled"][1], atol=LOGIT_ATOL)
    assert run(eng, [(pr, PENALISED) for pr in PROMPTS]) == ref["penalised"]
    logits = prefill_logits(eng.loaded, eng.sharder, PROMPTS[3])
    np.testing.assert_allclose(logits, ref["logits"], atol=LOGIT_ATOL, rtol=0)
    assert eng.runner.num_recompiles == 0
    _cache[("engine", family, tp)] = eng
    return {"kv_heads": eng.model_config.num_kv_heads,
            "max_logit_diff": float(np.abs(logits - ref["logits"]).max())}


# ---- data parallel -------------------------------------------------------------------------------
def check_dp2_tp4() -> dict[str, Any]:
    """Two tp=4 replicas on disjoint devices; every request answered as at tp=1; both used."""
    from serving.engine.data_parallel import DataParallelClient
    ref = _reference("llama")["greedy"]
    args = EngineArgs(**ENGINE_KW, tensor_parallel_size=4, data_parallel_size=2)
    client = DataParallelClient.from_args(args, loaded=tiny())
    devs = [{d.id for d in r.engine.sharder.devices} for r in client.replicas]  # type: ignore
    assert devs == [{0, 1, 2, 3}, {4, 5, 6, 7}], devs
    p = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> list[int]:
        toks: list[int] = []
        async for out in client.generate(client.make_request(f"dp{i}", prompt, p)):
            toks += [t for d in out.outputs for t in d.token_ids]
        return toks

    async def main() -> list[list[int]]:
        await client.start()
        try:
            return list(await asyncio.gather(*(one(i, pr) for i, pr in enumerate(PROMPTS))))
        finally:
            await client.shutdown(drain_timeout=5)

    got = asyncio.run(main())
    assert got == ref
    steps = [r.engine.get_stats().num_steps for r in client.replicas]
    assert all(s > 0 for s in steps), steps
    assert client.stats().generation_tokens_total == MAX_TOKENS * len(PROMPTS)
    return {"steps_per_replica": steps}


# ---- every leaf's sharding -----------------------------------------------------------------------
# Written out by hand (not derived from sharding.rules) for the tiny model: D=56, F=96, V=264,
# N=8, K=2, H=14. At tp=4 the kv heads are replicated to K'=4 (G'=2).
def _expected_tp4(vocab_sharded: bool) -> dict[str, P]:
    exp = {"embed.weight": P("model") if vocab_sharded else P(), "norm.weight": P()}
    for i in range(LAYERS):
        exp |= {f"layers.{i}.attn.qkv": P(None, "model"), f"layers.{i}.attn.o": P("model"),
                f"layers.{i}.mlp.gate_up": P(None, None, "model"),
                f"layers.{i}.mlp.down": P("model"),
                f"layers.{i}.input_norm.weight": P(), f"layers.{i}.post_attn_norm.weight": P()}
    return exp


def check_leaf_shardings() -> dict[str, Any]:
    """Walk the param tree and the KV cache: each leaf sits where the rules put it."""
    checked = 0
    for vocab, sharded in ((264, True), (259, False)):  # 259 does not split over 4: replicated
        eng = engine(4, tiny(vocab_size=vocab))
        mesh = eng.sharder.mesh  # type: ignore[union-attr]
        expected = _expected_tp4(sharded)
        # The state the compiled step receives, leaf by leaf.
        leaves = {_key(path): arr for path, arr
                  in jax.tree_util.tree_leaves_with_path(eng.runner.state)}
        assert set(leaves) == set(expected), sorted(set(leaves) ^ set(expected))
        for name, arr in leaves.items():
            want = NamedSharding(mesh, expected[name])
            assert arr.sharding.is_equivalent_to(want, arr.ndim), (name, arr.sharding)
            local = want.shard_shape(arr.shape)
            assert all(s.data.shape == local for s in arr.addressable_shards), name
            checked += 1
        assert tuple(eng.loaded.model.layers[0].attn.qkv.shape) == (56, 4, 4, 14)  # type: ignore
        for k, v in eng.runner.kv:
            for c in (k, v):
                assert c.shape[0] == 4
                assert c.sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 4)
                assert {s.data.shape[0] for s in c.addressable_shards} == {1}
                checked += 1
    return {"leaves_checked": checked}


def check_step_collectives() -> dict[str, Any]:
    """The compiled tp=4 step communicates activations only: one all-reduce of ``[T, D]`` per
    row-parallel matmul (o and down per layer, plus the vocab-split embedding lookup) and one
    all-gather of the ``[S, V]`` logits; never a weight or the KV cache."""
    import re
    eng = _cache.get(("engine", "llama", 4)) or engine(4, tiny())
    r = eng.runner
    text = r.step_hlo(16)
    found = re.findall(r"= (\S+?)\{[^}]*\} (all-reduce|all-gather|all-to-all|reduce-scatter|"
                       r"collective-permute)(?:-start)?\(", text)
    got = sorted((kind, shape) for shape, kind in found)
    s = r.cfg.num_seq_rows(16)
    want = sorted([("all-reduce", "f32[16,56]")] * (2 * LAYERS + 1) +
                  [("all-gather", f"f32[{s},264]")])
    assert got == want, got
    return {"collectives": got}


def _key(path: Any) -> str:
    parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]
    return ".".join(str(p) for p in parts if p not in (None, "value"))


# ---- the sampler on any mesh ---------------------------------------------------------------------
def check_sampler_mesh_invariant() -> dict[str, Any]:
    """Same logits and sampling inputs → bit-identical sampler output on every mesh, with every
    sampler feature switched on (grammar mask, penalties, bias, top-k/top-p/min-p, logprobs)."""
    s, v, hw = 6, 264, 32
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((s, v)).astype(np.float32) * 3
    hist = np.full((s, hw), -1, np.int32)
    hist[:, :20] = rng.integers(0, v, (s, 20))
    bias_ids = np.full((s, 8), -1, np.int32)
    bias_ids[:, :2] = [[5, 9]] * s
    mask = np.full((s, -(-v // 32)), -1, np.int32)
    mask[1, :4] = 0x0F0F0F0F  # one constrained row: 64 tokens allowed
    si = Sampling(
        temperature=np.array([0, 0.7, 1.0, 1.3, 1.0, 0.5], np.float32),
        top_k=np.array([0, 20, 0, 50, 5, 0], np.int32),
        top_p=np.array([1, 0.9, 0.8, 1, 1, 0.95], np.float32),
        min_p=np.array([0, 0, 0.05, 0, 0.1, 0], np.float32),
        presence=np.full(s, 0.3, np.float32), frequency=np.full(s, 0.2, np.float32),
        repetition=np.full(s, 1.1, np.float32), seeds=np.arange(s, dtype=np.uint32) * 7919,
        counters=np.arange(s, dtype=np.int32), bias_ids=bias_ids,
        bias_vals=np.where(bias_ids >= 0, 2.0, 0).astype(np.float32), history=hist,
        prompt_lens=np.full(s, 10, np.int32), mask=mask,
        flags=SamplingFlags(*(np.asarray(True) for _ in range(6))))
    ref = jax.device_get(jax.jit(sample)(jnp.asarray(logits), si))
    meshes = [MeshShape(1, 8), MeshShape(2, 4)]
    for shape in meshes:
        sh = Sharder(make_mesh(shape))
        # As the runner feeds it: inputs replicated, logits replicated by the step.
        out = jax.device_get(jax.jit(sample)(sh.put_replicated(logits), sh.put_inputs(si)))
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    return {"meshes": [str(m) for m in meshes], "tokens": ref.tokens.tolist()}


# ---- orbax ---------------------------------------------------------------------------------------
def check_orbax_round_trip() -> dict[str, Any]:
    """Convert a tp=2 model; restore into tp=1, tp=4 and tp=8 (kv heads replicated on restore):
    params and logits identical to the same mesh built from the original weights; an engine
    serving the directory at tp=4 answers as the tp=1 engine did."""
    from models.loader import load_model
    from serving.engine.convert import convert_loaded
    from serving.engine.sharded import _params
    src = tiny()
    out = convert_loaded(shard_loaded(src, sharder(2)), tempfile.mkdtemp() + "/ckpt")
    for tp in (1, 8):
        sh = sharder(tp)
        restored = shard_loaded(load_model(str(out), place=sh.place, progress=False), sh)
        direct = shard_loaded(src, sh)
        a, b = _params(restored.model), _params(direct.model)
        for name in b:
            x, y = a[name][...], b[name][...]
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), name
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # identical params on the same mesh: identical logits (checked once, on the kv-replicated one)
    np.testing.assert_array_equal(prefill_logits(restored, sh, PROMPTS[2]),
                                  prefill_logits(direct, sh, PROMPTS[2]))
    eng = LLMEngine(EngineArgs(**ENGINE_KW, model=str(out), tensor_parallel_size=4))
    assert eng.tokenizer.chat_template == src.tokenizer.chat_template
    assert greedy(eng, PROMPTS) == _reference("llama")["greedy"]
    return {"checkpoint": sorted(p.name for p in out.iterdir())}


# ---- multi-host reference ------------------------------------------------------------------------
def multihost_answer(eng: LLMEngine) -> list[list[int]]:
    """What the multi-host run compares: greedy, then penalised greedy (the followers replay the
    penalty history's writes too), each of ``PROMPTS`` in flight together."""
    return greedy(eng, PROMPTS) + [t for t, _ in run(eng, [(pr, PENALISED) for pr in PROMPTS])]


def greedy_tp8() -> list[list[int]]:
    """The single-process tp=8 answer the 2 x 4-device run must reproduce."""
    return multihost_answer(engine(8))


# ---- SmolLM2-135M: 9 query heads over 3 kv heads -----------------------------------------------
SMOL = "smollm2-135m-instruct"
SMOL_KW: dict[str, Any] = dict(max_model_len=256, max_num_seqs=2, max_num_batched_tokens=32,
                               token_buckets=(16,),
                               block_size=16, compilation_cache=False)


def check_smollm2_refuses_tp2() -> str:
    """tp=2 does not split 3 kv heads: refused from the GGUF header, before any weight is read."""
    from models.registry import ModelLoadError
    from serving.engine.sharded import make_sharder
    try:
        make_sharder(EngineArgs(model=SMOL, tensor_parallel_size=2))
    except ModelLoadError as e:
        msg = str(e)
    else:
        raise AssertionError("tp=2 was accepted for 3 kv heads")
    assert "tensor_parallel_size=2 cannot split 9 query heads / 3 kv heads" in msg, msg
    assert "valid sizes for this model: 1, 3, 9" in msg, msg
    sh = make_sharder(EngineArgs(model=SMOL, tensor_parallel_size=3))
    assert sh is not None and sh.tp == 3
    return msg


def check_smollm2_tp3() -> dict[str, Any]:
    """tp=3 (one kv head and three query heads per shard) answers exactly as tp=1."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = {}
    for tp in (1, 3):
        eng = LLMEngine(EngineArgs(model=SMOL, **SMOL_KW, tensor_parallel_size=tp))
        text = eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                 tokenize=False)
        prompt = eng.tokenizer.encode(text, add_special_tokens=False)
        out[tp] = greedy(eng, [prompt], max_tokens=8)[0]
        text = eng.tokenizer.decode(out[tp])
    assert out[3] == out[1], out
    assert "Paris" in text, text
    return {"text": text}


def check_convert_cli() -> dict[str, Any]:
    """``xlaserve-convert CKPT --output OUT --dtype bfloat16``: a checkpoint converted again,
    restored as bf16 with the same tokenizer; a non-empty target is refused without --force."""
    import jax.numpy as jnp

    from models.loader import load_model
    from serving.engine.convert import convert_loaded, main
    src = tiny()
    root = tempfile.mkdtemp()
    first = convert_loaded(src, root + "/f32")
    assert main([str(first), "--output", root + "/bf16", "--dtype", "bfloat16"]) == 0
    assert main([str(first), "--output", root + "/bf16", "--dtype", "bfloat16"]) == 1
    restored = load_model(root + "/bf16", progress=False)
    assert restored.dtype == jnp.bfloat16
    from serving.engine.sharded import _params
    a, b = _params(restored.model), _params(src.model)
    for name in b:
        np.testing.assert_array_equal(np.asarray(a[name][...]),
                                      np.asarray(b[name][...].astype(jnp.bfloat16)))
    assert restored.tokenizer.encode("héllo") == src.tokenizer.encode("héllo")
    return {"arrays": len(a)}


# ---- `serve --tensor-parallel-size 4` -----------------------------------------------------------
CHAT = [{"role": "user", "content": "Hello! Who are you?"}]
# Random weights: keep the answer to printable ASCII letters so that equal text means equal tokens.
LETTERS_ONLY = {t: -100.0 for t in range(264) if not chr(t).isalpha() or t > 127}


def tiny_checkpoint_and_chat_answer(out_dir: str) -> tuple[str, str]:
    """Write the tiny model as a checkpoint directory (what ``serve DIR`` loads) and return its
    greedy answer to ``CHAT`` from a single-device engine: what the tp=4 server must say."""
    from serving.engine.convert import convert_loaded
    ckpt = convert_loaded(tiny(), out_dir)
    llm = LLM(str(ckpt), **ENGINE_KW)
    text = llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    answer = llm.generate([llm.tokenizer.encode(text, add_special_tokens=False)],
                          SamplingParams(temperature=0.0, max_tokens=8,
                                         logit_bias=LETTERS_ONLY),
                          use_tqdm=False)[0].outputs[0].text
    assert len(answer) == 8 and answer.isalpha(), answer
    return str(ckpt), answer


# ---- pooling on a mesh ---------------------------------------------------------------------------
def _embeddings(eng: LLMEngine, inputs: list[list[int]], task: str = "embed") -> np.ndarray:
    from serving.engine.pooling_params import PoolingParams
    outs = LLM.from_engine(eng).encode(inputs, PoolingParams(task=task))
    return np.stack([o.data for o in outs])


def check_decoder_embeddings_tp_dp() -> dict[str, Any]:
    """Decoder embeddings (``--task embed``) on tp=2 and on two tp=1 data-parallel replicas
    equal the single-device ones; prompts longer than the budget are chunked."""
    from serving.engine.data_parallel import DataParallelClient
    from serving.engine.pooling_params import PoolingInput, PoolingParams
    kw = dict(ENGINE_KW, task="embed", max_num_batched_tokens=32, token_buckets=(16,))
    ref = _embeddings(engine(1, tiny(), **kw), PROMPTS)
    got = _embeddings(engine(2, tiny(), **kw), PROMPTS)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    client = DataParallelClient.from_args(
        EngineArgs(**kw, data_parallel_size=2), loaded=tiny())

    async def main() -> list[np.ndarray]:
        await client.start()
        try:
            outs = await asyncio.gather(*(client.encode([PoolingInput(p)], PoolingParams())
                                          for p in PROMPTS))
            return [o[0].data for o in outs]
        finally:
            await client.shutdown(drain_timeout=5)

    dp = np.stack(asyncio.run(main()))
    np.testing.assert_allclose(dp, ref, atol=1e-5, rtol=0)
    steps = [r.engine.get_stats().num_steps for r in client.replicas]
    assert all(s > 0 for s in steps), steps
    return {"max_diff_tp2": float(np.abs(got - ref).max()), "dp_steps": steps}


def check_encoder_tp2() -> dict[str, Any]:
    """A BERT cross-encoder sharded over 2 devices (heads split, attention in shard_map)
    scores as on one device."""
    from pathlib import Path
    model = str(Path(__file__).resolve().parents[1] / "fixtures" / "tiny-bert-cross-encoder")
    kw = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=128, token_buckets=(32,),
              compilation_cache=False)
    pairs = [([101, 7, 8, 9, 102, 11, 12, 102], [0, 0, 0, 0, 0, 1, 1, 1]),
             ([101, 20, 102, 21, 22, 23, 102], [0, 0, 0, 1, 1, 1, 1])]
    from serving.engine.pooling_params import PoolingInput, PoolingParams
    inputs = [PoolingInput(i, t) for i, t in pairs]
    scores = {}
    for tp in (1, 2):
        eng = LLMEngine(EngineArgs(model=model, tensor_parallel_size=tp, **kw))
        outs = LLM.from_engine(eng).encode(inputs, PoolingParams(task="score"))
        scores[tp] = np.stack([o.data for o in outs])
        assert eng.runner.num_recompiles == 0
    np.testing.assert_allclose(scores[2], scores[1], atol=1e-5, rtol=0)
    return {"scores": scores[2].tolist()}
