"""load_format="dummy" across ranks: every TP rank slices the same random tensors, so TP=2 on
random weights gives TP=1's greedy tokens (the multi-GPU benchmark relies on it)."""

from __future__ import annotations

from test_equivalence import _generate, assert_same_greedy


def test_dummy_weights_tp2_equal_tp1(dist_model):
    ref, _ = _generate(dist_model, load_format="dummy", seed=5)
    out, engine = _generate(
        dist_model, load_format="dummy", seed=5, tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )  # fmt: skip
    assert engine.runner is None  # ran in worker processes
    assert assert_same_greedy(ref, out) > 0
