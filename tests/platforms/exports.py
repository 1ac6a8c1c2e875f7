"""Export for another platform on this CPU host, and check what was exported.

``jax.export`` lowers a jitted function for ``cuda`` or ``tpu`` without that platform being
present: Pallas kernels become their platform's custom call (Triton on CUDA, Mosaic on TPU), and
the result is StableHLO, before XLA's own passes for that platform. The checks here read that
module (``module_facts``); what only the target compiler can tell (PTX/Mosaic compilation,
VMEM fit, the buffer assignment that honours the aliasing) needs the device run
(``bench/gpu_check.sh``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax import export

TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"
KERNEL_CALL = {"cuda": TRITON, "tpu": MOSAIC}
# Targets a step may hold besides its kernels: SPMD sharding annotations (meshes, shard_map).
SHARDING_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})
# Ops that talk to the host: a step that holds one stalls on the host every step.
HOST_OPS = ("stablehlo.send", "stablehlo.recv", "stablehlo.infeed", "stablehlo.outfeed")
# Ops that may produce a value of a whole layer's cache size without copying it: the kernels'
# aliased outputs, sharding annotations, and the plumbing of calls and results.
_CACHE_SIZED_OK = re.compile(
    r"stablehlo\.custom_call @(?:__gpu\$xla\.gpu\.triton|tpu_custom_call|Sharding|"
    r"SPMDFullToShardShape|SPMDShardToFullShape)\b|\bcall @|func\.call|func\.return|"
    r"stablehlo\.return|func\.func|sdy\.|\bshard_map\b")


def export_for(platform: str, fn: Callable[..., Any], args: Sequence[Any],
               donate: tuple[int, ...] = ()) -> export.Exported:
    """``fn`` jitted with ``donate`` and exported for ``platform`` at abstract ``args``.

    The Triton call has no stability guarantee across jaxlib versions, so export refuses it
    unless told; these modules are checked here and never serialized. Unused arguments are
    kept, so that main's argument i is the i-th leaf of ``args``."""
    checks = [export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
    jitted = jax.jit(fn, donate_argnums=donate, keep_unused=True)
    return export.export(jitted, platforms=[platform], disabled_checks=checks)(*args)


@dataclass(frozen=True)
class ModuleFacts:
    calls: Counter[str]  # custom-call target -> count
    host_ops: list[str]  # host transfer ops found
    # main's argument index -> the result it is aliased to (``tf.aliasing_output``), or None
    # for a donated argument whose alias XLA picks (``jax.buffer_donor``)
    aliased: dict[int, int | None]
    cache_ops: list[str]  # ops producing a cache-sized value other than the allowed ones


_TENSOR = re.compile(r"tensor<((?:\d+x)+)[a-z]\w*>")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(d) for d in text.rstrip("x").split("x")))


def _executed_calls(text: str) -> Counter[str]:
    """Custom-call target -> how many times one run of ``main`` executes it: JAX emits a jitted
    function called several times (a kernel, once per layer) as one private function with
    several ``call`` sites, so each function's own custom calls count once per call of it."""
    funcs: dict[str, str] = {}
    for m in re.finditer(r"func\.func (?:public |private )?@([\w$.]+)\(", text):
        funcs[m.group(1)] = ""
    bodies = re.split(r"(?=func\.func (?:public |private )?@)", text)
    for body in bodies:
        m = re.match(r"func\.func (?:public |private )?@([\w$.]+)\(", body)
        if m:
            funcs[m.group(1)] = body

    def count(name: str, seen: tuple[str, ...]) -> Counter[str]:
        body = funcs[name]
        out = Counter(re.findall(r"stablehlo\.custom_call @([\w$.]+)", body))
        for callee in re.findall(r"\bcall @([\w$.]+)\(", body):
            assert callee not in seen, f"recursive call to {callee}"
            for target, n in count(callee, (*seen, callee)).items():
                out[target] += n
        return out

    return count("main", ("main",))


def module_facts(exp: export.Exported,
                 cache_shapes: Sequence[tuple[int, ...]] = ()) -> ModuleFacts:
    """What ``exp``'s StableHLO holds. ``cache_shapes``: one layer's K or V cache shape (global
    and per shard); any op whose result has those dimensions, in any order, and is not a kernel
    call or plumbing is reported in ``cache_ops``: a copy, transpose, scatter, select or update
    of a whole cache, which on a device is a full HBM pass per layer per step. (Dimensions, not
    element counts: before XLA's passes a copy keeps the cache's dimensions, while an
    activation can have a cache shard's element count, e.g. [2048, 4096] and [1, 4096, 16, 128].)
    """
    text = exp.mlir_module()
    calls = _executed_calls(text)
    host = [op for op in HOST_OPS if op in text]
    main = re.search(r"func\.func public @main\((.*?)\)\s*->", text, re.S)
    assert main, "no public main in the exported module"
    # One chunk per argument (its attributes may hold braces, e.g. mhlo.sharding strings).
    chunks = re.split(r"(?=%arg\d+:)", main.group(1))
    aliased: dict[int, int | None] = {}
    for chunk in chunks:
        arg = re.match(r"%arg(\d+):", chunk)
        out = re.search(r"tf\.aliasing_output = (\d+)", chunk)
        if arg and out:
            aliased[int(arg.group(1))] = int(out.group(1))
        elif arg and "jax.buffer_donor = true" in chunk:
            aliased[int(arg.group(1))] = None  # donated; XLA picks the output it aliases
    shapes = {tuple(sorted(c)) for c in cache_shapes}
    cache_ops = []
    for line in text.splitlines():
        if "=" not in line or _CACHE_SIZED_OK.search(line):
            continue
        result = line.rsplit("->", 1)[-1] if "->" in line else line.rsplit(":", 1)[-1]
        if any(_dims(m) in shapes for m in _TENSOR.findall(result)):
            cache_ops.append(line.strip()[:200])
    return ModuleFacts(calls, host, aliased, cache_ops)


def assert_clean(facts: ModuleFacts, platform: str, *, kernels: int,
                 aliased_args: Sequence[int] = ()) -> None:
    """The module runs on ``platform`` as intended: exactly ``kernels`` kernel calls of that
    platform and no other custom call (no host callback, no CPU-only library call, no kernel of
    the other platform), no host transfer, every argument in ``aliased_args`` aliased to a
    result or marked as a donor (donation survived lowering), and no op copying a whole
    cache."""
    want = KERNEL_CALL[platform]
    assert facts.calls[want] == kernels, (want, kernels, dict(facts.calls))
    others = {t: n for t, n in facts.calls.items() if t != want and t not in SHARDING_CALLS}
    assert not others, f"unexpected custom calls on {platform}: {others}"
    assert not facts.host_ops, facts.host_ops
    missing = [a for a in aliased_args if a not in facts.aliased]
    assert not missing, f"arguments {missing} lost their donation (aliased: {facts.aliased})"
    outs = [o for o in facts.aliased.values() if o is not None]
    assert len(set(outs)) == len(outs), f"two arguments aliased to one result: {facts.aliased}"
    assert not facts.cache_ops, "whole-cache ops:\n" + "\n".join(facts.cache_ops[:5])
