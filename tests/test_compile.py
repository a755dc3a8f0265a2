"""torch.compile of the backbone's blocks (the Trainer's default on CUDA) agrees with eager on CPU: the Self-Flow
loss, its gradients and a sampled chunk, for the tiny model."""

import copy

import pytest
import torch

from tests.test_selfflow import _seq
from worldmodel.ema import EMA
from worldmodel.selfflow import SelfFlowConfig, SelfFlowObjective
from worldmodel.sizes import build_model
from worldmodel.train_step import compile_blocks
from worldmodel.trainer_config import TrainerConfig

torch.set_num_threads(1)


def test_compile_defaults_to_cuda_only():
    assert TrainerConfig().compiles_on(torch.device("cuda")) and not TrainerConfig().compiles_on(torch.device("cpu"))
    assert TrainerConfig(compile=True).compiles_on(torch.device("cpu"))
    assert not TrainerConfig(compile=False).compiles_on(torch.device("cuda"))
    with pytest.raises(ValueError, match="compile must be"):
        TrainerConfig(compile="yes")


@pytest.mark.slow
def test_compiled_blocks_match_eager_loss_and_gradients():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    eager = build_model("tiny")
    compiled = compile_blocks(copy.deepcopy(eager))
    assert all(hasattr(b, "_compiled_call_impl") for b in compiled.double_blocks)
    objective = SelfFlowObjective.for_model(eager, SelfFlowConfig())
    teacher = EMA(eager).model
    losses = []
    for model in (eager, compiled):
        loss, _ = objective.loss(model, teacher, _seq(), torch.Generator().manual_seed(3), factorize=True)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_trainer_compiles_backbone_and_ema_copy_only_when_asked(tmp_path):
    from tests.test_trainer import ToyTask, make_trainer

    auto = make_trainer(tmp_path / "auto", ToyTask())  # compile="auto" on CPU: eager
    assert getattr(auto.task.model, "_compiled_call_impl", None) is None
    on = make_trainer(tmp_path / "on", ToyTask(), compile=True)  # no blocks in the toy MLP: the module itself
    assert on.task.model._compiled_call_impl is not None and on.ema.model._compiled_call_impl is not None
    assert getattr(on.task.objective, "_compiled_call_impl", None) is None  # only the backbone
