"""The server gathers concurrent requests into batched calls: right answer to the right client, errors kept apart."""

import threading

import numpy as np
import pytest
import torch
from policy_doubles import INSTR, LinePolicy, _image, _make_policy

from policies.batching import RequestBatcher, ServerBusy
from policies.client import PolicyClient, PolicyServerError
from policies.serve import PolicyServer

torch.set_num_threads(1)
H = 4


class BatchLinePolicy(LinePolicy):
    """LinePolicy that takes a list of observations in one call (and fails the whole call on 'explode')."""

    batched_inference = True

    def __init__(self):
        super().__init__()
        self.batches = []

    def predict_action_chunk(self, obs):
        if not isinstance(obs, list):
            return super().predict_action_chunk(obs)
        self.batches.append(len(obs))
        if any(o["instruction"] == "explode" for o in obs):
            raise RuntimeError("boom in the batch")
        return [np.zeros((H, 6)) if o["instruction"] == "bad shape" else self.expected(o) for o in obs]


def _concurrent(port, observations):
    """Send each observation from its own client at once; returns replies (or exceptions) in the same order."""
    results, barrier = [None] * len(observations), threading.Barrier(len(observations))
    clients = [PolicyClient("127.0.0.1", port, retry_until_up_s=5) for _ in observations]

    def run(i):
        barrier.wait()
        try:
            results[i] = clients[i].infer(observations[i])
        except Exception as e:  # noqa: BLE001 - compared by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(observations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    return results


def test_concurrent_requests_batched_and_routed_errors_kept_apart():
    policy = BatchLinePolicy()
    obs = [{"image": _image((32, 40, 3), seed=i), "instruction": "go", "seed": i} for i in range(8)]
    obs[2] = {**obs[2], "instruction": "explode"}  # fails the batch it lands in
    obs[5] = {**obs[5], "instruction": "bad shape"}  # a wrong chunk for this row only
    obs[6] = {**obs[6], "image": np.zeros((4, 4), np.uint8)}  # refused before it is queued
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=16, max_wait_ms=300) as server:
        replies = _concurrent(server.port, obs)
        sizes = list(server.batcher.batch_sizes)
    for i, (o, reply) in enumerate(zip(obs, replies)):
        if i in (2, 5, 6):
            match = {2: "boom in the policy", 5: r"\(H, 7\)", 6: r"\(H, W, 3\)"}[i]
            assert isinstance(reply, PolicyServerError) and reply.remote_message, reply
            with pytest.raises(PolicyServerError, match=match):
                raise reply
            continue
        assert not isinstance(reply, Exception), reply
        actions, _ = LinePolicy.expected(o)  # this client's own image and seed
        np.testing.assert_array_equal(reply["actions"], actions)
    assert max(policy.batches) > 1 and max(sizes) > 1  # gathered, not one at a time
    assert sum(sizes) >= 7  # every queued request was answered through the batcher


def test_server_batches_match_single_calls_with_seeds():
    policy = _make_policy(sampling_steps=2)
    obs = [{"image": _image((48, 64, 3), seed=i), "instruction": INSTR if i % 2 else "open drawer", "seed": 20 + i}
           for i in range(4)]
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=4, max_wait_ms=300) as server:
        replies = _concurrent(server.port, obs)
        sizes = list(server.batcher.batch_sizes)
    for o, reply in zip(obs, replies):
        assert not isinstance(reply, Exception), reply
        single = policy.predict_action_chunk(o)
        np.testing.assert_allclose(reply["actions"], single["actions"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(reply["terminate"], single["terminate"])
    assert max(sizes) > 1


def test_batcher_limits_and_calls_in_order():
    gate, entered = threading.Event(), threading.Event()
    seen = []

    def run_batch(items):
        entered.set()
        gate.wait(10)
        seen.append(list(items))
        return [ValueError("odd") if x % 2 else x * 10 for x in items]

    batcher = RequestBatcher(run_batch, max_batch=3, max_wait_s=0.0, max_pending=5)
    try:
        first = batcher.submit(0)
        assert entered.wait(10)  # the worker now holds [0], blocked on the gate
        futures = [batcher.submit(i) for i in range(1, 5)]
        marker = batcher.call(lambda: "called")
        with pytest.raises(ServerBusy, match="waiting"):
            batcher.submit(99)
        gate.set()
        assert first.result(10) == 0 and marker.result(10) == "called"
        assert [f.exception(10) is not None for f in futures] == [True, False, True, False]
        assert futures[1].result() == 20 and futures[3].result() == 40
        assert seen[0] == [0] and seen[1] == [1, 2, 3] and seen[2] == [4]  # max_batch 3, the call kept its place
    finally:
        batcher.close()
    with pytest.raises(ValueError, match="max_batch"):
        RequestBatcher(run_batch, max_batch=0)
