"""Whole models: a tiny random Llama quantized to GPTQ by the test's own packer must decode the
same greedy tokens as the float model holding the dequantized weights; online FP8 must keep
log-probabilities within a stated bound of the float run.
"""

from __future__ import annotations

import json
import shutil

import pytest
import quant_packers as packers
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.loader import load_model
from engine.quantization import FP8UnavailableError
from hal.select import load_backend
from tests.engine.models_fixtures import PagedSequence, build_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPTQ_CONFIG = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 32,
    "sym": False,
    "desc_act": True,
    "checkpoint_format": "gptq",
}


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(float folder, GPTQ folder, dequantized-float folder) of one tiny random Llama."""
    root = tmp_path_factory.mktemp("quant_e2e")
    float_dir, gptq_dir, deq_dir = root / "float", root / "gptq", root / "deq"
    build_model("llama", float_dir)
    shutil.copytree(float_dir, gptq_dir)
    shutil.copytree(float_dir, deq_dir)
    weights = load_file(str(float_dir / "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in weights.items():
        if not _is_linear(name):
            quantized[name] = dequantized[name] = w
            continue
        tensors, w_deq = packers.gptq(w.float(), bits=4, group_size=32, sym=False, desc_act=True)
        prefix = name.removesuffix(".weight")
        quantized.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        dequantized[name] = w_deq
    save_file(quantized, str(gptq_dir / "model.safetensors"))
    save_file(dequantized, str(deq_dir / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = GPTQ_CONFIG
    (gptq_dir / "config.json").write_text(json.dumps(config))
    return float_dir, gptq_dir, deq_dir


PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 8, 250, 61, 33, 2 + 40]]


def _greedy(folder, **kw):
    llm = LLM(model=str(folder), dtype="float32", device="cpu", **kw)
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    return llm, [o.outputs[0] for o in outs]  # not shut down: the tests inspect its model


def test_gptq_model_decodes_like_its_dequantized_float_model(folders):
    _, gptq_dir, deq_dir = folders
    quantized, q_out = _greedy(gptq_dir)
    _, ref_out = _greedy(deq_dir)
    model = quantized.engine.model
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.quant_method.kernel.startswith("int4_linear")
    assert layer.mlp.down_proj.qweight.dtype == torch.int32
    for q, r in zip(q_out, ref_out, strict=True):
        assert q.token_ids == r.token_ids
        lq = [lp[t] for t, lp in zip(q.token_ids, q.logprobs, strict=True)]
        lr = [lp[t] for t, lp in zip(r.token_ids, r.logprobs, strict=True)]
        # Both run fp32 GEMMs over the same fp32 weight values (scales exact in fp32).
        assert max(abs(a - b) for a, b in zip(lq, lr, strict=True)) < 1e-4


def test_gptq_memory_plan_counts_quantized_bytes(folders):
    float_dir, gptq_dir, _ = folders
    q_llm = LLM(model=str(gptq_dir), dtype="float32", device="cpu")
    f_llm = LLM(model=str(float_dir), dtype="float32", device="cpu")
    q_bytes, f_bytes = q_llm.engine.memory_plan.weight_bytes, f_llm.engine.memory_plan.weight_bytes
    # Linear weights: fp32 -> 4-bit + fp16 scales + uint8 zeros + int32 g_idx (~0.9 byte / weight);
    # embeddings and LM head stay fp32, so the model shrinks but not eightfold.
    assert q_bytes < 0.8 * f_bytes


def _teacher_forced_logits(folder, backend, quantization=None) -> torch.Tensor:
    model, _, _ = load_model(folder, backend, "float32", quantization=quantization)
    seq = PagedSequence(model)
    tokens = [(7 * i + 3) % 380 + 1 for i in range(40)]
    return seq.step(tokens, all_logits=True)  # [40, vocab] fp32


U_E4M3 = 2.0**-4  # e4m3 keeps 3 mantissa bits: unit roundoff 2^-4


def test_online_fp8_logprobs_within_bound(folders, cpu_caps):
    """Bound, from e4m3's unit roundoff u = 2^-4: rounding a weight or an activation to e4m3
    errs by up to u relative (about u / sqrt(3) RMS); one GEMM output, with both rounded
    independently, by about u * sqrt(2/3) ~ 0.05 RMS relative. The tiny model's logits sit
    behind 8 GEMMs (2 layers x qkv, o, gate_up, down; the LM head stays float), so independent
    errors give ~sqrt(8) * 0.05 ~ 0.14 RMS relative to the logits' spread at most; we require
    < 4u = 0.25 (measured 0.11). Log-probabilities move by at most 2 max|d logit|, so with logits
    of spread ~0.8 the largest change over 40 positions x 384 tokens stays under 1 nat (measured
    0.43) and the mean under 2u = 0.125 (measured 0.07). A missing or misapplied scale breaks all
    three by orders of magnitude; exactness of the FP8 GEMM itself is tested per layer.
    """
    float_dir, _, _ = folders
    backend = load_backend(cpu_caps, configured="cpu")
    ref = _teacher_forced_logits(float_dir, backend)
    fp8 = _teacher_forced_logits(float_dir, backend, "fp8")
    d = fp8 - ref
    centered = ref - ref.mean(-1, keepdim=True)
    rel = (d - d.mean(-1, keepdim=True)).pow(2).mean().sqrt() / centered.pow(2).mean().sqrt()
    assert 0 < rel < 4 * U_E4M3, float(rel)
    dlp = (torch.log_softmax(fp8, -1) - torch.log_softmax(ref, -1)).abs()
    assert dlp.max() < 1.0 and dlp.mean() < 2 * U_E4M3, (float(dlp.max()), float(dlp.mean()))
    model, _, _ = load_model(float_dir, backend, "float32", quantization="fp8")
    qkv = model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and tuple(qkv.weight_scale.shape) == (128, 1)
    assert qkv.quant_method.kernel.startswith("fp8_linear")


def test_online_fp8_through_llm(folders):
    """LLM(quantization="fp8") reaches the loader (needs LLMEngine to pass it to load_model)."""
    float_dir, _, _ = folders
    llm, outs = _greedy(float_dir, quantization="fp8")
    qkv = llm.engine.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert all(len(o.token_ids) == 12 for o in outs)


def test_online_fp8_without_fp8_hardware_is_an_error(folders, cpu_caps):
    import dataclasses

    sm80 = dataclasses.replace(
        cpu_caps, vendor="nvidia", device_name="NVIDIA A100", arch="sm_80",
        compute_capability=(8, 0), fp8_format=None,
    )  # fmt: skip
    backend = load_backend(cpu_caps, configured="cpu")
    backend.caps = sm80  # the rule reads capabilities only
    with pytest.raises(FP8UnavailableError, match=r"NVIDIA A100 \(sm_80.*sm_89"):
        load_model(folders[0], backend, "float32", quantization="fp8")


def test_online_fp8_fuses_the_activation_quantize(folders, cpu_caps, monkeypatch):
    """qkv / gate_up read a norm and down_proj a SiLU-and-mul that quantize their output per
    token in the same backend op (rms_norm_quant_fp8 / silu_and_mul_quant_fp8, the HAL's
    composition on the CPU); o_proj quantizes its own input. The logits equal the unfused path's
    bit for bit, and the fused ops ran 2 and 1 times per layer."""
    float_dir, _, _ = folders
    backend = load_backend(cpu_caps, configured="cpu")
    model, _, _ = load_model(float_dir, backend, "float32", quantization="fp8")
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.fp8_input_dtype() == torch.float8_e4m3fn
    assert layer.mlp.gate_up_proj.fp8_input_dtype() == torch.float8_e4m3fn
    assert layer.mlp.down_proj.fp8_input_dtype() == torch.float8_e4m3fn
    calls = {"rms_norm_quant_fp8": 0, "silu_and_mul_quant_fp8": 0}
    for name in calls:
        original = getattr(type(backend), name)

        def counted(self, *a, _name=name, _fn=original, **k):
            calls[_name] += 1
            return _fn(self, *a, **k)

        monkeypatch.setattr(type(backend), name, counted)
    fused = _teacher_forced_logits(float_dir, backend, "fp8")
    layers = len(model.layers)
    assert calls == {"rms_norm_quant_fp8": 2 * layers, "silu_and_mul_quant_fp8": layers}
    from engine.quantization.fp8 import FP8LinearMethod

    monkeypatch.setattr(FP8LinearMethod, "fp8_input_dtype", lambda self, layer: None)
    unfused = _teacher_forced_logits(float_dir, backend, "fp8")
    assert calls == {"rms_norm_quant_fp8": 2 * layers, "silu_and_mul_quant_fp8": layers}
    assert torch.equal(fused, unfused)
