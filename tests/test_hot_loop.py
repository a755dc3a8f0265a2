"""The training hot loop reads nothing back to the host: the objective, clipping, metric sums and the sampler
loop run with every Tensor -> Python conversion forbidden; and per-rank draws differ, reproducibly."""

import contextlib

import pytest
import torch

from tests.test_selfflow import _seq
from worldmodel.ema import EMA
from worldmodel.rng import draw_generator, draw_seed
from worldmodel.selfflow import SelfFlowConfig, SelfFlowObjective, dual_timestep
from worldmodel.sizes import build_model
from worldmodel.train_step import DeviceMeans, clip_gradients

torch.set_num_threads(1)
HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every Tensor -> Python conversion raises inside the block (each one is a device sync on CUDA)."""
    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} in the hot loop")
        return read

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, forbidden(name))
        yield


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def test_the_guard_catches_a_host_read(monkeypatch):
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(()) > 0)


def test_selfflow_loss_backward_and_clipping_make_no_host_read(tiny, monkeypatch):
    objective = SelfFlowObjective.for_model(tiny, SelfFlowConfig())
    teacher = EMA(tiny).model
    seq = _seq()
    means = DeviceMeans()
    with no_host_reads(monkeypatch):
        loss, metrics = objective.loss(tiny, teacher, seq, torch.Generator().manual_seed(0), factorize=True)
        loss.backward()
        norm = clip_gradients([p for p in tiny.parameters() if p.requires_grad], 1.0)
        means.add(metrics)
        means.add({"grad_norm": norm})
    got = means.means()
    assert got["loss"] == pytest.approx(float(loss.detach())) and "flow/action" in got and got["grad_norm"] > 0
    tiny.zero_grad(set_to_none=True)


def test_factorize_true_equals_the_checked_path():
    seq = _seq()
    cfg = SelfFlowConfig(modality_shift={"action": 3.0})
    checked = dual_timestep(seq, cfg, torch.Generator().manual_seed(1))
    trusted = dual_timestep(seq, cfg, torch.Generator().manual_seed(1), factorize=True)
    for a, b in zip(checked, trusted):
        assert (a is None and b is None) or torch.equal(a, b)
    assert checked.time_levels is not None
    assert dual_timestep(seq, cfg, torch.Generator().manual_seed(1), factorize=False).time_levels is None


def test_device_means_skip_unreported_values():
    means = DeviceMeans()
    means.add({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})
    means.add({"a": 3.0, "b": torch.tensor(5.0)})
    means.add({"c": float("nan")})
    assert means.means() == {"a": 2.0, "b": 5.0}  # c never reported: absent, not zero


def test_clipping_scales_only_above_the_threshold():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 2.0)  # norm 4
    assert float(clip_gradients([p], 1.0)) == pytest.approx(4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5))
    p.grad = torch.full((4,), 0.1)
    clip_gradients([p], 1.0)
    assert torch.equal(p.grad, torch.full((4,), 0.1))  # below the threshold: untouched (times exactly 1)


def test_per_rank_draws_differ_and_are_reproducible():
    def noise(rank, micro=7):
        return torch.randn(16, generator=draw_generator(3, "objective", micro, rank))

    assert torch.equal(noise(0), noise(0)) and torch.equal(noise(1), noise(1))
    assert not torch.equal(noise(0), noise(1))
    assert not torch.equal(noise(0, micro=8), noise(0))
    assert draw_seed(3, "objective", 7, 0) != draw_seed(3, "caption_dropout", 7, 0)
    with pytest.raises(ValueError, match="unknown draw purpose"):
        draw_seed(0, "nosie", 0)


def test_pretraining_ranks_draw_different_noise_times_and_dropout():
    """The same batch on rank 0 and rank 1: different objective draws and caption dropout; each rank repeats its own."""
    from worldmodel.codecs import build_frame_codec
    from worldmodel.data import ProceduralImages
    from worldmodel.pretrain import ModalityStream, PretrainTask
    from worldmodel.text import ByteTextEncoder

    torch.manual_seed(0)
    codec = build_frame_codec("patch", patch=4)
    text = ByteTextEncoder(dim=64, max_len=16, layers=1)
    model = build_model("tiny", token_dim={"image": codec.token_dim}, text_dim=text.feature_dim)
    objective = SelfFlowObjective.for_model(model, SelfFlowConfig.plain_flow_matching())
    stream = ModalityStream("image", ProceduralImages(size=16, length=32, seed=0), codec, 8, 1.0)
    task = PretrainTask(model, objective, text, [stream], caption_dropout=0.3, seed=0)
    batch = next(task.batches(0, 0, 1))
    drops, losses = {}, {}
    for rank in (0, 1, 0):
        one = {**batch, "rank": rank}
        drops.setdefault(rank, []).append(task.build_sequence(one, "cpu").text_drop)
        losses.setdefault(rank, []).append(float(task.loss(one, 0, None)[0]))
    assert torch.equal(drops[0][0], drops[0][1]) and losses[0][0] == losses[0][1]
    assert not torch.equal(drops[0][0], drops[1][0]) and losses[0][0] != losses[1][0]
    assert next(task.batches(0, 1, 2))["rank"] == 1
