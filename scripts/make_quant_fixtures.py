"""Make tests/fixtures/quant/: a tiny random Llama quantized by the real tools, with references.

Each fixture is a Hugging Face folder (config.json with quantization_config, model.safetensors,
tokenizer files) plus reference.json (greedy tokens, top-2 logprobs, dequantized-weight hashes)
and dequant_ref.safetensors (the producing library's dequantized weights, W as [N out, K in]).

Which virtual environment each part needs (see tests/fixtures/quant/README.md for the installs):
  /work/venv-llmc   torch 2.13.0 + llmcompressor 0.14.0.1 (compressed-tensors 0.19.0,
                    transformers 5.17): ct_w4a16_sym, ct_w4a16_asym, ct_w8a8_int8, ct_fp8_channel,
                    ct_fp8_block
  /work/venv-ct018  torch 2.13.0 + llmcompressor 0.13.0 (compressed-tensors 0.18.0, the last to
                    write actorder=group): ct_w4a16_gidx
  /work/venv-gptq   torch 2.13.0 + gptqmodel 7.6.0, optimum 2.3.0, auto-round 0.16.1
                    (transformers 5.24): gptq_*, awq_gemm, ar_*

Run with no --only to make every fixture the current venv can make (the others are listed as
skipped, with the venv they need); `--verify-only` re-checks the layout formulas on fixtures already
on disk. The formulas used by `formula_dequant` are the layouts of issue 12, written out
independently of every library, and are checked bit for bit against each library's own dequantizer.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "quant"
VOCAB = 384
NEW_TOKENS = 12
PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "lazy dog jumps",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
]
# Layers whose dequantized weights are recorded: N = intermediate (up) and K = intermediate (down),
# so groups / FP8 blocks repeat along both dimensions.
DEQUANT_LAYERS = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# the tiny model and its tokenizer
# --------------------------------------------------------------------------------------------


def byte_level_tokenizer():
    """The same byte-level BPE as tests/engine/models_fixtures.py (inlined: no engine import)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?"]
    tok.train_from_iterator(corpus * 8, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def build_base(
    folder: Path, hidden: int, inter: int, dtype: torch.dtype, gqa: bool = True, seed: int = 0
):
    """A random Llama (2 layers, tied embeddings) saved to folder in dtype; returns the folder.

    gqa=False keeps k/v projections as wide as q (GPTQModel's AWQ clip search needs every
    projection's out features to be a multiple of 64).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = hidden // 32
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=heads,
        # kv projections stay a multiple of 128 rows when hidden is (the FP8 block fixture)
        num_key_value_heads=heads if hidden % 128 == 0 or not gqa else max(1, heads // 2),
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,  # larger than the default so greedy choices are not near-ties
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "model.norm.weight":  # sharp logits: greedy choices far from ties
                p.copy_(4.0 + 0.4 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def calibration_ids(n: int = 16, length: int = 48, seed: int = 1) -> list[list[int]]:
    """Random token sequences (ids 3..VOCAB-1): calibration needs activations, not meaning."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g).tolist()


def prompt_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


# --------------------------------------------------------------------------------------------
# issue 12's layouts, written out independently (W is [N out, K in], fp32 results)
# --------------------------------------------------------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of an AWQ word holds column AWQ_ORDER[k]


def unpack_dim0(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R/pf, C] -> int64 [R, C]: element i at bits bits*(i % pf) of word i // pf."""
    pf = 32 // bits
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    vals = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * pf, packed.shape[1])


def unpack_dim1(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C/pf] -> int64 [R, C]: element j at bits bits*(j % pf) of word j // pf."""
    return unpack_dim0(packed.t(), bits).t()


def gptq_dequant(t: dict, bits: int, v1: bool) -> torch.Tensor:
    """GPTQ: qweight [K/pf, N], qzeros [K/G, N/pf], scales [K/G, N], g_idx [K] -> W [N, K]."""
    q = unpack_dim0(t["qweight"], bits)  # [K, N]
    z = unpack_dim1(t["qzeros"], bits) + (1 if v1 else 0)  # [K/G, N]
    k = q.shape[0]
    g_idx = t["g_idx"].long() if "g_idx" in t else None
    if g_idx is None:
        group = k // t["scales"].shape[0]
        g_idx = torch.arange(k) // group
    s = t["scales"].float()
    w = (q - z[g_idx]).float() * s[g_idx]  # [K, N]
    return w.t().contiguous()


def awq_dequant(t: dict, bits: int = 4) -> torch.Tensor:
    """AWQ GEMM: qweight [K, N/8], qzeros [K/G, N/8] (AWQ nibble order), scales [K/G, N]."""
    order = torch.tensor(AWQ_ORDER)

    def unorder(packed):
        raw = unpack_dim1(packed, bits)  # column 8w+k holds nibble k of word w
        out = torch.empty_like(raw)
        cols = torch.arange(raw.shape[1])
        out[:, (cols // 8) * 8 + order[cols % 8]] = raw
        return out

    q, z = unorder(t["qweight"]), unorder(t["qzeros"])  # [K, N], [K/G, N]
    g_idx = torch.arange(q.shape[0]) // (q.shape[0] // t["scales"].shape[0])
    w = (q - z[g_idx]).float() * t["scales"].float()[g_idx]
    return w.t().contiguous()


def ct_dequant(t: dict, bits: int = 4) -> torch.Tensor:
    """compressed-tensors pack-quantized / int8 / fp8 -> W [N, K]."""
    if "weight_packed" in t:
        off = 1 << (bits - 1)
        q = unpack_dim1(t["weight_packed"], bits) - off  # [N, K]
        s = t["weight_scale"].float()  # [N, K/G]
        k = q.shape[1]
        if "weight_g_idx" in t:
            g_idx = t["weight_g_idx"].long()
        else:
            g_idx = torch.arange(k) // (k // s.shape[1])
        zp = torch.zeros_like(q[:, : s.shape[1]])
        if "weight_zero_point" in t:
            zp = unpack_dim0(t["weight_zero_point"], bits)[: q.shape[0]] - off  # [N, K/G]
        return (q - zp[:, g_idx]).float() * s[:, g_idx]
    w, s = t["weight"], t["weight_scale"].float()
    if s.shape == w.shape[:1] + (1,) or s.numel() == 1:
        return w.float() * s
    bn, bk = -(-w.shape[0] // s.shape[0]), -(-w.shape[1] // s.shape[1])  # block [bn, bk]
    s_full = s.repeat_interleave(bn, 0)[: w.shape[0]].repeat_interleave(bk, 1)[:, : w.shape[1]]
    return w.float() * s_full


def formula_dequant(qcfg: dict, t: dict) -> torch.Tensor:
    """Dispatch on a checkpoint's quantization_config to the layouts above."""
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        return ct_dequant(t)
    if method == "awq":
        return awq_dequant(t, qcfg.get("bits", 4))
    if method == "gptq":
        fmt = qcfg.get("checkpoint_format", "gptq")
        return gptq_dequant(t, qcfg["bits"], v1=fmt == "gptq")
    if method in ("auto-round", "intel/auto-round"):
        packing = qcfg.get("packing_format", "auto_round:auto_gptq")
        if "awq" in packing:
            return awq_dequant(t, qcfg["bits"])
        # "auto_round:auto_gptq" (and plain gptq exports) store z - 1 (v1); auto-round's own
        # "auto_round" packing (auto_round_extension qlinear_torch) stores z itself (v2-like)
        return gptq_dequant(t, qcfg["bits"], v1="gptq" in packing)
    raise ValueError(f"no formula for quant_method {method!r}")


def layer_tensors(folder: Path, prefix: str) -> dict:
    """The checkpoint tensors of one linear layer (weight_packed, scales, ...) by suffix."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == "dequant_ref.safetensors":
            continue
        for k, v in load_file(f).items():
            if k.startswith(prefix + "."):
                out[k[len(prefix) + 1 :]] = v
    if not out:
        raise KeyError(f"no tensors under {prefix!r} in {folder}")
    return out


def formula_state_dict(folder: Path) -> tuple[dict, dict]:
    """Every tensor of the checkpoint, with each quantized linear replaced by its fp32 W."""
    cfg = json.loads((folder / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    raw = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "dequant_ref.safetensors":
            raw.update(load_file(f))
    prefixes = {k.rsplit(".", 1)[0] for k in raw if k.split(".")[-2] in LINEAR_NAMES}
    sd = {k: v.float() for k, v in raw.items() if k.rsplit(".", 1)[0] not in prefixes}
    for p in sorted(prefixes):
        t = {k[len(p) + 1 :]: v for k, v in raw.items() if k.startswith(p + ".")}
        if "weight" in t and "weight_scale" not in t:  # left unquantized
            sd[p + ".weight"] = t["weight"].float()
        else:
            sd[p + ".weight"] = formula_dequant(qcfg, t)
        if "bias" in t:
            sd[p + ".bias"] = t["bias"].float()
    return sd, cfg


# --------------------------------------------------------------------------------------------
# the fp32 reference: formulas applied into a plain transformers model
# --------------------------------------------------------------------------------------------


def act_quant_args(qcfg: dict) -> dict | None:
    """compressed-tensors dynamic input-activation args of the (single) config group, if any."""
    if qcfg.get("quant_method") != "compressed-tensors":
        return None
    groups = list(qcfg.get("config_groups", {}).values())
    return groups[0].get("input_activations") if groups else None


def fake_quant_act(x: torch.Tensor, args: dict) -> torch.Tensor:
    """Dynamic symmetric activation QDQ in fp32, as compressed-tensors does it.

    int8: scale = absmax / 127.5 (its range (127 - -128) / 2), round, clamp [-128, 127].
    fp8 e4m3: scale = absmax / 448, cast. Per token, or per group of group_size along K.
    """
    shape = x.shape
    if args.get("strategy") == "group":
        x = x.unflatten(-1, (shape[-1] // args["group_size"], args["group_size"]))
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if args["type"] == "int":
        s = absmax / 127.5
        q = torch.round(x / s).clamp(-128, 127)
    else:
        s = absmax / 448.0
        q = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(shape)


def reference_model(folder: Path):
    """A plain fp32 LlamaForCausalLM holding the formula-dequantized weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    sd, cfg = formula_state_dict(folder)
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    plain["dtype"] = "float32"
    config = LlamaConfig(**{k: v for k, v in plain.items() if k not in ("architectures",)})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    if missing or unexpected:
        raise RuntimeError(f"reference model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    args = act_quant_args(cfg["quantization_config"])
    if args is not None:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEAR_NAMES:
                mod.register_forward_pre_hook(lambda m, inp: (fake_quant_act(inp[0], args),))
    return model


@torch.no_grad()
def greedy(model, prompts: list[list[int]]) -> list[dict]:
    """transformers generate(do_sample=False), EOS off: tokens and top-2 logprobs per step."""
    model.generation_config.eos_token_id = None
    out = []
    for ids in prompts:
        res = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = res.sequences[0, len(ids) :].tolist()
        top2 = []
        for logits in res.logits:
            lp = torch.log_softmax(logits[0].float(), -1)
            v, i = lp.topk(2)
            top2.append([[int(i[0]), float(v[0])], [int(i[1]), float(v[1])]])
        out.append({"prompt_ids": ids, "tokens": tokens, "top2": top2})
    return out


def min_margin(runs: list[dict]) -> float:
    return min(s[0][1] - s[1][1] for r in runs for s in r["top2"])


# --------------------------------------------------------------------------------------------
# producing libraries' own dequantizers and quantized forward paths
# --------------------------------------------------------------------------------------------


def ct_library(folder: Path) -> tuple[dict, list[dict], str]:
    """compressed-tensors: decompress per layer with its compressor; transformers' own load."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoModelForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    group = list(qcfg["config_groups"].values())[0]
    scheme = QuantizationScheme(
        targets=group["targets"],
        weights=group["weights"],
        input_activations=group.get("input_activations"),
    )
    compressor = BaseCompressor.load_from_registry(qcfg["format"])
    deq = {}
    for layer in DEQUANT_LAYERS:
        t = layer_tensors(folder, layer)
        if qcfg["format"] in ("pack-quantized",):
            deq[layer] = compressor.decompress(t, scheme)["weight"]
        else:
            deq[layer] = _ct_decompress_dense(compressor, t, scheme)
    # fp32 load: scales upcast, so decompression is exact and comparable with the reference
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()
    runs = greedy(model, prompt_ids(folder))
    how = f"transformers {md.version('transformers')} from_pretrained(dtype=float32), CT decompress"
    return deq, runs, how


def _ct_decompress_dense(compressor, t: dict, scheme) -> torch.Tensor:
    """naive/float-quantized: the compressor's decompress takes the per-module state dict."""
    out = compressor.decompress(dict(t), scheme)
    return out["weight"]


def autoround_library(folder: Path) -> tuple[dict, list[dict], str]:
    """auto-round's own format: transformers load (auto-round's QuantLinear), W from forward(I)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    mods = dict(model.named_modules())
    deq = {}
    with torch.no_grad():
        for layer in DEQUANT_LAYERS:
            m = mods[layer]
            k = m.infeatures if hasattr(m, "infeatures") else m.in_features
            eye = torch.eye(k, dtype=m.scales.dtype)  # one nonzero term per output: exact
            deq[layer] = m(eye).t().contiguous()  # [N, K]
    runs = greedy(model, prompt_ids(folder))
    how = (
        f"transformers {md.version('transformers')} from_pretrained, auto-round "
        f"{md.version('auto-round')} {type(mods[DEQUANT_LAYERS[0]]).__module__} ({model.dtype}); "
        "W = forward(identity)"
    )
    return deq, runs, how


def gptqmodel_library(folder: Path, awq: bool) -> tuple[dict, list[dict], str]:
    """GPTQModel: load with its torch CPU kernel, dequantize_weight per layer, generate."""
    from gptqmodel import BACKEND, GPTQModel

    backend = BACKEND.AWQ_TORCH if awq else BACKEND.TORCH
    model = GPTQModel.load(str(folder), backend=backend, device="cpu")
    mods = dict(model.model.named_modules())
    deq = {}
    for layer in DEQUANT_LAYERS:
        m = mods[layer]
        if awq:
            from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

            w = dequantize_gemm(m.qweight, m.qzeros, m.scales, m.bits, m.group_size)
        else:
            w = m.dequantize_weight()
        deq[layer] = w.t().contiguous()  # both return [K, N]
    hf = model.model.eval()
    runs = greedy(hf, prompt_ids(folder))
    dt = next(iter(hf.parameters())).dtype
    how = f"gptqmodel {md.version('gptqmodel')} load(backend={backend.value}) generate ({dt})"
    return deq, runs, how


# --------------------------------------------------------------------------------------------
# the producers
# --------------------------------------------------------------------------------------------


def llmc_quantize(base: Path, out: Path, recipe) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    tok = AutoTokenizer.from_pretrained(base)
    ids = calibration_ids()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=64,
        num_calibration_samples=len(ids),
    )
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)


def ct_w4a16(base: Path, out: Path, sym: bool, actorder: str | None = None) -> None:
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": sym,
        "strategy": "group",
        "group_size": 32,
    }
    if actorder:
        weights["actorder"] = actorder
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
    )
    llmc_quantize(base, out, recipe)


def ct_scheme(base: Path, out: Path, scheme: str) -> None:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    llmc_quantize(
        base, out, QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    )


def gptqmodel_quantize(base: Path, out: Path, **kw) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    awq = kw.get("quant_method") == "awq"
    if awq:
        from gptqmodel.quantization.config import AWQConfig

        qcfg = AWQConfig(bits=4, group_size=32, sym=kw.get("sym", False))
    else:
        qcfg = QuantizeConfig(**{"bits": 4, "group_size": 32, **kw})
    model = GPTQModel.load(str(base), qcfg, device="cpu")
    calib = [{"input_ids": i, "attention_mask": [1] * len(i)} for i in calibration_ids()]
    model.quantize(calib, batch_size=4, backend=BACKEND.AWQ_TORCH if awq else BACKEND.TORCH)
    model.save(str(out))


def autoround_quantize(base: Path, out: Path, fmt: str, sym: bool = False) -> None:
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    tok = AutoTokenizer.from_pretrained(base)
    texts = [tok.decode(i) for i in calibration_ids()]
    ar = AutoRound(
        model,
        tok,
        bits=4,
        group_size=32,
        sym=sym,
        dataset=texts,
        nsamples=16,
        seqlen=32,
        iters=20,
        enable_torch_compile=False,
    )
    ar.quantize_and_save(str(out), format=fmt)


@dataclass
class Fixture:
    name: str
    venv: str
    tool: str  # distribution whose version is recorded
    make: object  # (base, out) -> None
    hidden: int = 64
    inter: int = 128
    dtype: torch.dtype = torch.bfloat16
    lib: str = "ct"  # which library dequantizer: ct | gptq | awq | autoround
    gqa: bool = True
    notes: list[str] = field(default_factory=list)


def _fixtures() -> list[Fixture]:
    f = Fixture
    return [
        f("ct_w4a16_sym", "venv-llmc", "llmcompressor", lambda b, o: ct_w4a16(b, o, True)),
        f("ct_w4a16_asym", "venv-llmc", "llmcompressor", lambda b, o: ct_w4a16(b, o, False)),
        f(
            "ct_w4a16_gidx",
            "venv-ct018",
            "llmcompressor",
            lambda b, o: ct_w4a16(b, o, True, actorder="group"),
        ),
        f("ct_w8a8_int8", "venv-llmc", "llmcompressor", lambda b, o: ct_scheme(b, o, "W8A8")),
        f(
            "ct_fp8_channel",
            "venv-llmc",
            "llmcompressor",
            lambda b, o: ct_scheme(b, o, "FP8_DYNAMIC"),
        ),
        f(
            "ct_fp8_block",
            "venv-llmc",
            "llmcompressor",
            lambda b, o: ct_scheme(b, o, "FP8_BLOCK"),
            hidden=128,
            inter=256,
        ),
        f(
            "gptq_sym",
            "venv-gptq",
            "gptqmodel",
            lambda b, o: gptqmodel_quantize(b, o, sym=True),
            dtype=torch.float16,
            lib="gptq",
        ),
        f(
            "gptq_asym",
            "venv-gptq",
            "gptqmodel",
            lambda b, o: gptqmodel_quantize(b, o, sym=False),
            dtype=torch.float16,
            lib="gptq",
        ),
        f(
            "gptq_desc_act",
            "venv-gptq",
            "gptqmodel",
            lambda b, o: gptqmodel_quantize(b, o, sym=False, desc_act=True, act_group_aware=False),
            dtype=torch.float16,
            lib="gptq",
        ),
        f(
            "gptq_v2",
            "venv-gptq",
            "gptqmodel",
            lambda b, o: gptqmodel_quantize(b, o, sym=False, format="gptq_v2"),
            dtype=torch.float16,
            lib="gptq",
        ),
        f(
            "gptq_8bit",
            "venv-gptq",
            "gptqmodel",
            lambda b, o: gptqmodel_quantize(b, o, bits=8, sym=True),
            dtype=torch.float16,
            lib="gptq",
        ),
        f(
            "awq_gemm",
            "venv-gptq",
            "gptqmodel",
            lambda b, o: gptqmodel_quantize(b, o, quant_method="awq"),
            dtype=torch.float16,
            lib="awq",
            gqa=False,
        ),
        f(
            "ar_auto_gptq",
            "venv-gptq",
            "auto-round",
            lambda b, o: autoround_quantize(b, o, "auto_gptq", sym=True),
            dtype=torch.float16,
            lib="gptq",
        ),
        f(
            "ar_auto_awq",
            "venv-gptq",
            "auto-round",
            lambda b, o: autoround_quantize(b, o, "auto_awq"),
            dtype=torch.float16,
            lib="awq",
            gqa=False,
        ),
        f(
            "ar_auto_round",
            "venv-gptq",
            "auto-round",
            lambda b, o: autoround_quantize(b, o, "auto_round"),
            dtype=torch.float16,
            lib="autoround",
        ),
    ]


FIXTURES = {fx.name: fx for fx in _fixtures()}


def can_make(fx: Fixture) -> str | None:
    """None when this venv can make fx, else why not."""
    try:
        if fx.venv == "venv-ct018":
            v = md.version("compressed-tensors")
            return None if v.startswith("0.18") else f"compressed-tensors {v} (needs 0.18)"
        if fx.venv == "venv-llmc":
            md.version("llmcompressor")
            v = md.version("compressed-tensors")
            return None if v.startswith("0.19") else f"compressed-tensors {v} (needs 0.19)"
        md.version("gptqmodel")
        md.version("auto-round")
    except md.PackageNotFoundError as e:
        return f"{e.name} not installed"
    return None


# --------------------------------------------------------------------------------------------
# one fixture end to end
# --------------------------------------------------------------------------------------------


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def library_dequant(fx: Fixture, folder: Path) -> tuple[dict, list[dict], str]:
    if fx.lib == "ct":
        return ct_library(folder)
    if fx.lib == "autoround":
        return autoround_library(folder)
    return gptqmodel_library(folder, awq=fx.lib == "awq")


def compare(lib: torch.Tensor, formula: torch.Tensor, qcfg: dict, t: dict) -> dict:
    """How the library's dequantized W relates to the fp32 formula's.

    equal_in_library_dtype: formula(checkpoint scales) rounded once to the library's dtype.
    equal_with_scales_cast: formula with the scales first cast to the library's dtype (what
    GPTQModel's CPU kernel does: fp16 scales -> bf16, then (q - z) * s in bf16).
    """
    cast = {k: (v.to(lib.dtype) if "scale" in k else v) for k, v in t.items()}
    f_cast = formula_dequant(qcfg, cast)
    return {
        "library_dtype": str(lib.dtype).removeprefix("torch."),
        "checkpoint_scale_dtype": next(
            str(v.dtype).removeprefix("torch.") for k, v in t.items() if "scale" in k
        ),
        "shape": list(lib.shape),
        "equal_in_library_dtype": bool(torch.equal(formula.to(lib.dtype), lib)),
        "equal_with_scales_cast": bool(torch.equal(f_cast.to(lib.dtype), lib)),
        "equal_in_fp32": bool(torch.equal(formula, lib.float())),
        "max_abs_diff_fp32": float((formula - lib.float()).abs().max()),
    }


def make(fx: Fixture, out_root: Path) -> dict:
    out = out_root / fx.name
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(Path(tmp) / "base", fx.hidden, fx.inter, fx.dtype, fx.gqa)
        work = Path(tmp) / "quant"
        fx.make(base, work)
        work = next(work.rglob("config.json")).parent  # auto-round adds a <model>-w4g32/ level
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for p in work.iterdir():  # checkpoint, config and tokenizer files only
            if p.suffix in (".json", ".safetensors", ".jinja", ".txt") and p.is_file():
                shutil.copy(p, out / p.name)
    quant_time = time.time() - t0
    return write_reference(fx, out, quant_time)


def write_reference(fx: Fixture, out: Path, quant_time: float | None = None) -> dict:
    ref_model = reference_model(out)
    ids = prompt_ids(out)
    ref_runs = greedy(ref_model, ids)
    lib_deq, lib_runs, lib_how = library_dequant(fx, out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    dequant, tensors = {}, {}
    for layer in DEQUANT_LAYERS:
        t = layer_tensors(out, layer)
        formula = formula_dequant(qcfg, t)
        lib = lib_deq[layer].cpu()
        info = compare(lib, formula, qcfg, t)
        info["sha256_library"] = sha256(lib)
        info["sha256_formula_fp32"] = sha256(formula)  # the fp32 W the reference model holds
        tensors[layer] = lib.contiguous()
        dequant[layer] = info
    save_file(tensors, out / "dequant_ref.safetensors")
    lib_tokens = [r["tokens"] for r in lib_runs]
    ref = {
        "name": fx.name,
        "tool": fx.tool,
        "tool_version": md.version(fx.tool),
        "venv": fx.venv,
        "versions": {
            p: md.version(p)
            for p in ("torch", "transformers", "compressed-tensors", "gptqmodel", "auto-round")
            if _installed(p)
        },
        "quantization_config": qcfg,
        "new_tokens": NEW_TOKENS,
        "prompts": PROMPTS,
        "reference_source": (
            "formulas of issue 12 applied into a plain fp32 LlamaForCausalLM (transformers "
            f"{md.version('transformers')}, eager attention)"
            + (", with dynamic fp32 activation QDQ" if act_quant_args(qcfg) else "")
        ),
        "greedy": ref_runs,
        "min_top2_margin": min_margin(ref_runs),
        "library_path": {
            "how": lib_how,
            "tokens": lib_tokens,
            "min_top2_margin": min_margin(lib_runs),
            "agrees_with_reference": lib_tokens == [r["tokens"] for r in ref_runs],
        },
        "dequant_layers": dequant,
        "dequant_ref_file": (
            "dequant_ref.safetensors: key = layer name, value = the library's dequantized W "
            "[N out, K in] in library_dtype (sha256_library is the hash of its raw bytes)"
        ),
    }
    if quant_time is not None:
        ref["make_seconds"] = round(quant_time, 1)
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return ref


def _installed(p: str) -> bool:
    try:
        md.version(p)
        return True
    except md.PackageNotFoundError:
        return False


def print_table(refs: list[dict]) -> None:
    print(
        f"\n{'fixture':16} {'layer':31} {'ckpt s':8} {'lib':8} {'=lib':5} {'=cast':5} {'=fp32':5}"
        f" {'max|d|':8} {'lib tok==ref':12} margin"
    )
    for r in refs:
        for layer, d in r["dequant_layers"].items():
            print(
                f"{r['name']:16} {layer.removeprefix('model.'):31} "
                f"{d['checkpoint_scale_dtype']:8} {d['library_dtype']:8} "
                f"{str(d['equal_in_library_dtype']):5} {str(d['equal_with_scales_cast']):5} "
                f"{str(d['equal_in_fp32']):5} {d['max_abs_diff_fp32']:<8.1e} "
                f"{str(r['library_path']['agrees_with_reference']):12} {r['min_top2_margin']:.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--only", action="append", choices=sorted(FIXTURES), help="fixture (repeatable)"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root folder")
    ap.add_argument(
        "--verify-only",
        action="store_true",
        help="recompute reference.json from fixtures already on disk",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = args.only or sorted(FIXTURES)
    refs = []
    for name in names:
        fx = FIXTURES[name]
        why = can_make(fx)
        if why is not None:
            print(f"skip {name}: needs /work/{fx.venv} ({why})")
            continue
        print(f"== {name} ({fx.tool} {md.version(fx.tool)})", flush=True)
        if args.verify_only:
            refs.append(write_reference(fx, args.out / name))
        else:
            refs.append(make(fx, args.out))
    if refs:
        print_table(refs)
    bad = [
        r["name"]
        for r in refs
        for d in r["dequant_layers"].values()
        if not (d["equal_in_library_dtype"] or d["equal_with_scales_cast"])
    ]
    if bad:
        print(f"formula mismatch in {sorted(set(bad))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
