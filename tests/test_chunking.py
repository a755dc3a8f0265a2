"""policies.chunking: the action queue and ACT temporal ensembling, against hand-computed cases."""

import numpy as np
import pytest

from policies.chunking import ActionQueue, TemporalEnsembler


def test_queue_executes_k_then_refills():
    q = ActionQueue(execute_steps=2)
    assert q.empty
    chunks = [np.arange(8.0).reshape(4, 2) + 100 * i for i in range(3)]  # (H=4, D=2)
    out, calls = [], 0
    for _ in range(5):
        if q.empty:
            q.push(chunks[calls])
            calls += 1
        out.append(q.pop())
    # rows 0, 1 of chunk 0; rows 0, 1 of chunk 1; row 0 of chunk 2
    expect = [[0, 1], [2, 3], [100, 101], [102, 103], [200, 201]]
    np.testing.assert_array_equal(np.stack(out), expect)
    assert calls == 3 and len(q) == 1
    q.reset()
    assert q.empty


def test_queue_whole_chunk_and_errors():
    q = ActionQueue()
    q.push(np.ones((3, 7)))
    assert len(q) == 3
    with pytest.raises(ValueError, match="still holds"):
        q.push(np.ones((3, 7)))
    for _ in range(3):
        q.pop()
    with pytest.raises(ValueError, match="empty"):
        q.pop()
    with pytest.raises(ValueError, match="exceeds"):
        ActionQueue(5).push(np.ones((3, 7)))
    with pytest.raises(ValueError, match=">= 1"):
        ActionQueue(0)
    with pytest.raises(ValueError, match=r"\(H, D\)"):
        q.push(np.ones((2, 3, 4)))


def test_queue_single_step_replans_every_step():
    q = ActionQueue(1)
    for i in range(3):
        assert q.empty
        q.push(np.full((4, 1), float(i)))
        assert q.pop()[0] == i


def test_ensembler_hand_computed():
    c = 0.5
    ens = TemporalEnsembler(horizon=3, coeff=c)
    # chunk predicted at step s has value 10*s + j at row j (its prediction for step s + j)
    chunk = lambda s: np.array([[10 * s + j] for j in range(3)], float)  # noqa: E731
    w0, w1, w2 = 1.0, np.exp(-c), np.exp(-2 * c)  # w0 for the OLDEST prediction
    # step 0: only chunk 0 row 0
    assert ens.update(chunk(0))[0] == pytest.approx(0.0)
    # step 1: chunk 0 row 1 (=1, oldest), chunk 1 row 0 (=10)
    assert ens.update(chunk(1))[0] == pytest.approx((w0 * 1 + w1 * 10) / (w0 + w1))
    # step 2: chunk0 row2 (=2), chunk1 row1 (=11), chunk2 row0 (=20)
    assert ens.update(chunk(2))[0] == pytest.approx((w0 * 2 + w1 * 11 + w2 * 20) / (w0 + w1 + w2))
    # step 3: chunk 0 no longer covers; chunk1 row2 (=12), chunk2 row1 (=21), chunk3 row0 (=30)
    assert ens.update(chunk(3))[0] == pytest.approx((w0 * 12 + w1 * 21 + w2 * 30) / (w0 + w1 + w2))
    ens.reset()
    assert ens.update(chunk(7))[0] == pytest.approx(70.0)


def test_ensembler_coeff_sign_and_zero():
    h = 4
    old, new = np.zeros((h, 2)), np.ones((h, 2))
    mean = TemporalEnsembler(h, 0.0)
    mean.update(old)
    np.testing.assert_allclose(mean.update(new), [0.5, 0.5])
    favour_old, favour_new = TemporalEnsembler(h, 2.0), TemporalEnsembler(h, -2.0)
    favour_old.update(old)
    favour_new.update(old)
    assert favour_old.update(new)[0] < 0.5 < favour_new.update(new)[0]


def test_ensembler_constant_chunks_are_fixed_points_and_errors():
    ens = TemporalEnsembler(5, 0.01)
    for _ in range(12):
        np.testing.assert_allclose(ens.update(np.tile([1.0, -2.0, 3.0], (5, 1))), [1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="horizon"):
        ens.update(np.ones((4, 3)))
    with pytest.raises(ValueError, match="width"):
        ens.update(np.ones((5, 2)))
    with pytest.raises(ValueError, match=">= 1"):
        TemporalEnsembler(0)
