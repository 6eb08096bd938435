"""The Ray executor on a local three-node Ray cluster on 127.0.0.1 gives the multiprocess tokens
(TP=2), and the in-process tokens with two pipeline stages and two batches in flight (PP=2).

One CPU per node, so the placement group's two bundles (one per rank) land on different nodes.
"""

from __future__ import annotations

import time

import pytest

from engine import LLM, SamplingParams

ray = pytest.importorskip("ray")

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 12, 13]]


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray session is already connected in this process")
    start = time.monotonic()
    node = dict(num_cpus=1, include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args={**node, "node_ip_address": "127.0.0.1"})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    assert time.monotonic() - start < 60
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _tokens(model: str, backend: str | None, **layout):
    llm = LLM(
        model=model,
        dtype="float32",
        device="cpu",
        kv_cache_memory_bytes=2 << 20,
        distributed_executor_backend=backend,
        **(layout or {"tensor_parallel_size": 2}),
    )
    try:
        outputs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs], llm.engine.executor
    finally:
        llm.shutdown()


def test_ray_matches_multiprocess(ray_cluster, dist_model):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    want, _ = _tokens(dist_model, "mp")
    got, executor = _tokens(dist_model, "ray")
    assert got == want
    assert executor.kind == "ray" and executor.master_addr == "127.0.0.1"
    assert len(set(executor.bundle_nodes)) == 2  # the two ranks ran on two Ray nodes
    assert executor.actors == []  # shut down: actors killed, placement group removed
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    )


def test_ray_pipeline_runs_two_batches_in_flight(ray_cluster, dist_model):
    """PP=2 on two Ray nodes: an actor runs one caller's calls in submission order, so stage 0
    takes the next batch while stage 1 runs the current one; tokens equal the in-process run."""
    want, _ = _tokens(dist_model, None, tensor_parallel_size=1)
    got, executor = _tokens(dist_model, "ray", pipeline_parallel_size=2)
    assert got == want
    assert executor.kind == "ray" and executor.max_in_flight == 2
    assert len(set(executor.bundle_nodes)) == 2
