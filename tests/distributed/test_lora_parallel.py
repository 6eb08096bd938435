"""LoRA adapters on tensor- and pipeline-parallel engines (worker processes, gloo): each rank
holds its shard of every adapter's slots (column-parallel B rows, row-parallel A columns whose
partial deltas join the all-reduce), the steps carry the slots and the loads, and the tokens
are transformers' on PEFT's merge, as in one process (tests/engine/test_lora.py)."""

from __future__ import annotations

import pytest

from engine import LLM, LoRARequest, SamplingParams
from tests.engine.lora_fixtures import NUM_TOKENS, PROMPT, build_lora_fixture

GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_lora_fixture(tmp_path_factory.mktemp("lora_parallel"))


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2xpp2"])
def test_adapters_across_ranks(fx, tp, pp) -> None:
    llm = LLM(model=str(fx.base), dtype="float32", device="cpu", kv_cache_memory_bytes=4 << 20,
              tensor_parallel_size=tp, pipeline_parallel_size=pp, enable_lora=True,
              max_loras=1, max_lora_rank=8)  # fmt: skip
    try:
        engine = llm.engine
        assert engine.runner is None and engine.executor.kind == "mp"
        a, b = (LoRARequest(n, i, str(fx.adapters[n])) for n, i in (("all8", 1), ("qv4", 2)))
        # one slot for two adapters: the steps carry a load each time the adapter changes
        order = [a, None, b, a]
        outs = llm.generate(prompt_token_ids=[PROMPT] * 4, sampling_params=GREEDY,
                            lora_request=order)  # fmt: skip
        want = [fx.refs[None if r is None else r.lora_name] for r in order]
        assert [o.outputs[0].token_ids for o in outs] == want
        assert engine.kv_stats().num_used_blocks == 0
        assert all(n == 0 for n in engine.lora.users.values())
        assert engine.executor.failure is None
    finally:
        llm.shutdown()
