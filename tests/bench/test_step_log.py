"""bench/e2e.py's StepLog: the steps an end-to-end run plans, grouped by kind (decode, mixed,
prefill), with the scheduler left as it was afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "engine"))

import e2e  # noqa: E402
from models_fixtures import build_model  # noqa: E402


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from engine import LLM

    folder = tmp_path_factory.mktemp("steplog")
    build_model("llama", folder)
    llm = LLM(model=str(folder), device="cpu", seed=1, max_num_seqs=4, max_num_batched_tokens=64)
    yield llm
    llm.shutdown()


def test_step_log_groups_the_steps_of_a_run(llm) -> None:
    from engine import SamplingParams

    prompts = [[3 + (i * 7 + j) % 80 for j in range(40)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    before = llm.engine.num_steps
    with e2e.StepLog(llm) as log:
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    steps = llm.engine.num_steps - before
    planned = [r for r in log.rows if r[1]]
    # 6 prompts of 40 tokens through a 64-token budget: prefill chunks, then decode steps
    assert abs(len(planned) - steps) <= 1, (len(planned), steps)
    assert all(tokens >= seqs and dec <= seqs for _, seqs, tokens, dec in planned)
    lines = log.summary()
    assert lines[0].startswith(f"steps: {len(planned)} in ")
    kinds = {line.split()[0] for line in lines[1:]}
    assert "decode" in kinds and kinds & {"mixed", "prefill"}, lines
    # the scheduler's own methods are back
    assert "schedule" not in vars(llm.engine.scheduler)
    assert "schedule_ahead" not in vars(llm.engine.scheduler)
