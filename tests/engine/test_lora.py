"""LoRA adapters (engine.lora) on the CPU engine against transformers with PEFT's merge of the
same adapters, mixed in one batch, through fewer slots than adapters, with the prefix cache,
and bad adapters refused with errors that say what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from engine import LoRARequest, SamplingParams
from engine.lora import LoRAError
from tests.engine.lora_fixtures import NUM_TOKENS, PROMPT, build_lora_fixture, make_adapter
from tests.engine.models_fixtures import build_model, cpu_llm, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_lora_fixture(tmp_path_factory.mktemp("lora"))


def req(fx, name: str, lora_id: int) -> LoRARequest:
    return LoRARequest(name, lora_id, str(fx.adapters[name]))


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_idle(llm) -> None:
    e = llm.engine
    assert not e.has_unfinished_requests()
    assert e.kv_stats().num_used_blocks == 0
    assert all(n == 0 for n in e.lora.users.values()), e.lora.users


def test_mixed_batch_matches_transformers(fx) -> None:
    # Two adapters (all seven projections at rank 8; q / v / down at rank 4 with rsLoRA's
    # scaling) and the base model in one batch: each prompt's tokens are those of
    # transformers on the model PEFT merged, and so are their log-probabilities (fp32).
    llm = cpu_llm(fx.base, enable_lora=True, max_loras=2, max_lora_rank=8)
    loras = [req(fx, "all8", 1), None, req(fx, "qv4", 2), req(fx, "all8", 1)]
    outs = llm.generate(prompt_token_ids=[PROMPT] * 4, sampling_params=GREEDY,
                        lora_request=loras)  # fmt: skip
    assert tokens(outs) == [fx.refs["all8"], fx.refs[None], fx.refs["qv4"], fx.refs["all8"]]
    for out, name in zip(outs, ["all8", None, "qv4"], strict=False):
        _, ref_lp = hf_greedy(fx.merged[name], PROMPT, NUM_TOKENS)
        got = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids,
                                             strict=True)]  # fmt: skip
        assert max(abs(a - b) for a, b in zip(got, ref_lp, strict=True)) < 1e-4
    assert_idle(llm)


def test_one_slot_serves_adapters_in_turn(fx) -> None:
    # max_loras=1: a request of another adapter waits until the resident one has no request
    # left, in arrival order; every request still gets its own adapter's tokens.
    llm = cpu_llm(fx.base, enable_lora=True, max_loras=1, max_lora_rank=8)
    order = ["all8", "qv4", None, "all8", "qv4"]
    loras = [None if n is None else req(fx, n, 1 if n == "all8" else 2) for n in order]
    outs = llm.generate(prompt_token_ids=[PROMPT] * 5, sampling_params=GREEDY,
                        lora_request=loras)  # fmt: skip
    assert tokens(outs) == [fx.refs[n] for n in order]
    assert_idle(llm)
    assert list(llm.engine.lora.slot_of.values()) == [0]


def test_chat_and_single_request(fx) -> None:
    llm = cpu_llm(fx.base, enable_lora=True, max_lora_rank=8)
    conv = [{"role": "user", "content": "hi"}]
    a = llm.chat(conv, GREEDY, lora_request=req(fx, "qv4", 7))
    b = llm.chat(conv, GREEDY)
    assert tokens(a) != tokens(b)
    assert a[0].prompt_token_ids == b[0].prompt_token_ids
    assert tokens(a)[0] == hf_greedy(fx.merged["qv4"], a[0].prompt_token_ids, NUM_TOKENS)[0]


def test_beam_search_through_an_adapter(fx) -> None:
    # Beam width 1 is greedy: each prompt's single beam gives its adapter's greedy tokens.
    from engine import BeamSearchParams

    llm = cpu_llm(fx.base, enable_lora=True, max_loras=2, max_lora_rank=8)
    params = BeamSearchParams(beam_width=1, max_tokens=NUM_TOKENS, ignore_eos=True)
    outs = llm.beam_search([PROMPT, PROMPT], params, lora_request=[req(fx, "qv4", 2), None])
    got = [o.sequences[0].output_token_ids for o in outs]
    assert got == [fx.refs["qv4"], fx.refs[None]]
    assert_idle(llm)


def test_prefix_cache_is_kept_per_adapter(fx) -> None:
    # A 40-token prompt fills two 16-token blocks: the base model's cached blocks must not
    # serve the adapter's request (their keys start from the adapter id), and the adapter's
    # own second request hits its own.
    prompt = (PROMPT * 7)[:40]
    llm = cpu_llm(fx.base, enable_lora=True, max_lora_rank=8)
    ref = hf_greedy(fx.merged["all8"], prompt, 4)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    base = llm.generate(prompt_token_ids=[prompt], sampling_params=params)
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=params,
                         lora_request=req(fx, "all8", 1))  # fmt: skip
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=params,
                         lora_request=req(fx, "all8", 1))  # fmt: skip
    assert tokens(first)[0] == tokens(again)[0] == ref != tokens(base)[0]
    assert first[0].num_cached_tokens == 0 and again[0].num_cached_tokens == 32
    assert_idle(llm)


def test_abort_of_a_waiting_request(fx) -> None:
    llm = cpu_llm(fx.base, enable_lora=True, max_lora_rank=8)
    e = llm.engine
    e.add_request(None, GREEDY, PROMPT, "a", lora_request=req(fx, "all8", 1))
    e.add_request(None, GREEDY, PROMPT, "b", lora_request=req(fx, "qv4", 2))  # waits
    assert [r.request_id for r in e._lora_waiting] == ["b"] and e.num_lora_waiting == 1
    assert e.abort_request("b")
    finished = {}
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["b"].outputs[0].finish_reason == "abort"
    assert finished["a"].outputs[0].token_ids == fx.refs["all8"]
    assert_idle(llm)


def test_forget_waits_for_unfinished_requests(fx) -> None:
    # A server unloading an adapter: forgotten at once when idle, else once its last request
    # finishes (that request still runs through it); a later request reads it again.
    llm = cpu_llm(fx.base, enable_lora=True, max_lora_rank=8)
    e, lora = llm.engine, req(fx, "all8", 1)
    e.add_request(None, GREEDY, PROMPT, "a", lora_request=lora)
    e.lora.forget(1)
    assert 1 in e.lora.adapters and 1 in e.lora.slot_of
    outs = [o for _ in range(NUM_TOKENS + 2) for o in e.step() if o.finished]
    assert outs[0].outputs[0].token_ids == fx.refs["all8"]
    assert 1 not in e.lora.adapters and not e.lora.slot_of
    again = llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY, lora_request=lora)
    assert tokens(again) == [fx.refs["all8"]]
    e.lora.forget(1)  # idle: gone at once
    assert not e.lora.adapters and not e.lora.slot_of and not e.lora.users


def test_waiting_request_of_a_dropped_adapter(fx, tmp_path) -> None:
    # An adapter dropped while its request waits for a slot is read again at admission; when
    # its folder is gone by then, that request ends as aborted and the engine goes on.
    import shutil

    llm = cpu_llm(fx.base, enable_lora=True, max_lora_rank=8)
    e = llm.engine
    for name, folder in (("kept", tmp_path / "kept"), ("gone", tmp_path / "gone")):
        shutil.copytree(fx.adapters["qv4"], folder)
        e.add_request(None, GREEDY, PROMPT, f"first-{name}", lora_request=req(fx, "all8", 1))
        lora = LoRARequest(name, 2 if name == "kept" else 3, str(folder))
        e.add_request(None, GREEDY, PROMPT, name, lora_request=lora)  # waits: one slot
        e.lora.forget(lora.lora_int_id)  # idle (never admitted): dropped at once
        assert lora.lora_int_id not in e.lora.adapters
        if name == "gone":
            shutil.rmtree(folder)
        done = {}
        while e.has_unfinished_requests():
            done.update({o.request_id: o for o in e.step() if o.finished})
        assert done[f"first-{name}"].outputs[0].token_ids == fx.refs["all8"]
        if name == "kept":
            assert done[name].outputs[0].token_ids == fx.refs["qv4"]
        else:
            assert done[name].outputs[0].finish_reason == "abort"
        assert_idle(llm)


def test_bad_input(fx, tmp_path) -> None:
    llm = cpu_llm(fx.base, enable_lora=True, max_lora_rank=4)
    gen = llm.generate

    def refused(lora, match):
        with pytest.raises(LoRAError, match=match):
            gen(prompt_token_ids=[PROMPT], sampling_params=GREEDY, lora_request=lora)

    refused(req(fx, "all8", 1), r"rank r=8 exceeds max_lora_rank=4; .* max_lora_rank >= 8")
    refused(LoRARequest("x", 3, str(tmp_path / "none")), "adapter_config.json not found")
    bad = tmp_path / "bias"
    bad.mkdir()
    cfg = json.loads((fx.adapters["qv4"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    refused(LoRARequest("b", 4, str(bad)), "bias='all' is not supported")
    # an adapter made for another model: its shapes name the expected ones
    other = build_model("qwen3", tmp_path / "qwen3")
    make_adapter(other, tmp_path / "q3", 0, 4, ("q_proj",))
    refused(LoRARequest("q3", 5, str(tmp_path / "q3")), r"has shape \(128, 4\), expected \(64, 4\)")
    # the same id for another folder
    gen(prompt_token_ids=[PROMPT], sampling_params=GREEDY, lora_request=req(fx, "qv4", 6))
    refused(LoRARequest("again", 6, str(tmp_path / "q3")), "lora_int_id 6 is already 'qv4'")
    # nothing was queued by a refused call
    assert_idle(llm)
    plain = cpu_llm(fx.base)
    with pytest.raises(ValueError, match="serves no LoRA adapters; build it with enable_lora"):
        plain.generate(prompt_token_ids=[PROMPT], lora_request=req(fx, "qv4", 1))
    with pytest.raises(ValueError, match="got 2 lora_requests for 1 prompts"):
        gen(prompt_token_ids=[PROMPT], lora_request=[None, None])
    with pytest.raises(ValueError, match="lora_int_id: expected an integer >= 1"):
        LoRARequest("x", 0, "/p")


def test_ngram_drafts_verified_through_each_adapter(fx) -> None:
    # n-gram speculative decoding on a LoRA engine: a step's drafts count in their sequence's
    # tokens, so each draft is verified through its request's adapter, and greedy output is
    # transformers' on the merged model whatever the drafts (one-token matches: many drafts).
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    llm = cpu_llm(fx.base, enable_lora=True, max_loras=2, max_lora_rank=8,
                  speculative_config=ngram)  # fmt: skip
    loras = [req(fx, "all8", 1), None, req(fx, "qv4", 2)]
    outs = llm.generate(prompt_token_ids=[PROMPT] * 3, sampling_params=GREEDY,
                        lora_request=loras)  # fmt: skip
    assert tokens(outs) == [fx.refs["all8"], fx.refs[None], fx.refs["qv4"]]
    assert llm.engine.scheduler.num_accepted_tokens > 0  # drafts ran, and some were right
    assert_idle(llm)


def test_unsupported_target_and_missing_half(fx, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    llm = cpu_llm(fx.base, enable_lora=True, max_lora_rank=8)
    src = fx.adapters["qv4"]
    weights = load_file(str(src / "adapter_model.safetensors"))
    gone = "layers.1.mlp.down_proj.lora_B"
    embed = "base_model.model.model.embed_tokens.lora_A.weight"
    for name, change in (
        ("half", lambda w: {k: v for k, v in w.items() if gone not in k}),
        ("embed", lambda w: {**w, embed: torch.zeros(4, 384)}),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        save_file(change(weights), str(folder / "adapter_model.safetensors"))
        with pytest.raises(LoRAError) as e:
            llm.generate(prompt_token_ids=[PROMPT], lora_request=LoRARequest(name, 9, str(folder)))
        assert ("has no lora_B" if name == "half" else "embeddings and the LM head") in str(e.value)
    assert_idle(llm)


def test_graph_replays_equal_eager_steps(fx) -> None:
    # Decode and mixed-step captures read the token slots from their static buffer: replays
    # (eager "captures" on the CPU, real graphs on a GPU in test_on_a_gpu) give the eager
    # steps' logits, for steps with adapters, padded buckets, and the base model alone.
    import hal
    import platforms
    from engine.loader import load_model
    from engine.lora import LoRAManager, LoRAWeights
    from engine.runner import ModelRunner
    from engine.scheduler import ScheduledSeq, SchedulerOutput
    from engine.sequence import Request, Sequence

    backend = hal.load_backend(platforms.detect(), device="cpu", configured="cpu")
    model, config, _ = load_model(str(fx.base), backend, "float32", with_tokenizer=False)
    lora = LoRAManager(config, 2, 8)
    weights = LoRAWeights(model, 2, 8)
    for name, i in (("all8", 1), ("qv4", 2)):
        lora.register(req(fx, name, i))
        lora.acquire(i)
    weights.begin(lora.step_lora([]))  # the two loads

    def runner(sizes, mixed):
        r = ModelRunner(model, backend, 4, model.dtype, graph_sizes=sizes, max_model_len=64,
                        mixed_graph_sizes=mixed, max_num_seqs=4)  # fmt: skip
        r.lora, r.lora_manager = weights, lora
        r.allocate(32)
        r.capture_graphs(allow_eager=True)
        return r

    def steps(r, ids):
        tables = [[1 + 3 * i, 2 + 3 * i, 3 + 3 * i] for i in range(len(ids))]
        loras = {1: req(fx, "all8", 1), 2: req(fx, "qv4", 2), None: None}
        seqs = [Sequence(i, Request(f"r{i}", PROMPT, SamplingParams(), lora_request=loras[lid]),
                         list(PROMPT)) for i, lid in enumerate(ids)]  # fmt: skip

        def sched(i, start, toks):
            slots = [tables[i][p // 4] * 4 + p % 4 for p in range(start, start + len(toks))]
            return ScheduledSeq(seqs[i], len(toks), start, toks, tables[i], slots, 1)

        pre = r.execute(SchedulerOutput([sched(i, 0, PROMPT[:-1]) for i in range(len(ids))]))
        dec = r.execute(SchedulerOutput([sched(i, 5, PROMPT[-1:]) for i in range(len(ids))]))
        return pre, dec

    eager, graphed = runner((), ()), runner((1, 2, 4), (16, 32))
    for ids in ([1, None, 2], [2], [None, None]):
        before = (graphed.graphs.replays, graphed.mixed_graphs.replays)
        for a, b in zip(steps(eager, ids), steps(graphed, ids), strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert (graphed.graphs.replays, graphed.mixed_graphs.replays) == (
            before[0] + 1,
            before[1] + 1,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("spec", [None, "ngram"])
def test_on_a_gpu(fx, spec) -> None:
    # The same deltas on the GPU backend, eager and replayed from CUDA graphs (fp32: TF32
    # GEMMs may move logprobs by ~1e-2, as in test_llm_gpu), two adapters and the base model
    # in one batch; with n-gram drafts verified through each request's adapter too.
    from engine import LLM

    extra = {} if spec is None else {"speculative_config": {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}}  # fmt: skip
    for eager in (True, False):
        llm = LLM(model=str(fx.base), dtype="float32", device="cuda", gpu_memory_utilization=0.3,
                  enable_lora=True, max_loras=2, max_lora_rank=8, enforce_eager=eager,
                  **extra)  # fmt: skip
        assert (llm.engine.runner.graphs is None) == eager
        assert any("LoRA: 2 adapter slots" in line for line in llm.engine.startup_report())
        loras = [req(fx, "all8", 1), None, req(fx, "qv4", 2)]
        outs = llm.generate(prompt_token_ids=[PROMPT] * 3, sampling_params=GREEDY,
                            lora_request=loras)  # fmt: skip
        assert tokens(outs) == [fx.refs["all8"], fx.refs[None], fx.refs["qv4"]]
        if not eager:
            assert llm.engine.runner.graphs.replays > 0
        if spec is not None:
            assert llm.engine.scheduler.num_accepted_tokens > 0
        assert_idle(llm)
        llm.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_decode_kernels_on_a_gpu(fx, monkeypatch) -> None:
    # bf16 decode steps of <= 16 tokens take the Triton shrink / expand kernels (each token its
    # own slot; backends.triton.lora, checked against the reference in its own tests): replayed
    # from CUDA graphs they give the eager engine's tokens, and each adapter changes the output.
    from backends.triton import lora as kernels
    from engine import LLM

    calls = []
    launch = kernels.lora_add
    monkeypatch.setattr(kernels, "lora_add", lambda *a: calls.append(a[0].shape[0]) or launch(*a))

    loras = [req(fx, "all8", 1), None, req(fx, "qv4", 2)]
    runs = []
    for eager in (True, False):
        llm = LLM(model=str(fx.base), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3,
                  enable_lora=True, max_loras=2, max_lora_rank=8, enforce_eager=eager)  # fmt: skip
        outs = llm.generate(prompt_token_ids=[PROMPT] * 3, sampling_params=GREEDY,
                            lora_request=loras)  # fmt: skip
        assert calls and max(calls) <= kernels.MAX_TOKENS
        calls.clear()
        runs.append(tokens(outs))
        assert_idle(llm)
        llm.shutdown()
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1] and runs[0][2] != runs[0][1]
