"""Two gloo CPU processes: data parallel (and FSDP2) runs match one process at the same global batch, and resume."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from toy_training import Interrupt, ToyTask, _stop_at, make_trainer

from worldmodel.distributed import DistInfo, average_gradients, init_distributed

pytestmark = pytest.mark.slow  # two gloo processes per test
torch.set_num_threads(1)
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, fsdp: bool) -> None:
    """One torchrun-like rank: train with an interruption at step 2, resume, write the losses."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        kw = dict(max_steps=STEPS, checkpoint_every=2, eval_every=2, fsdp=fsdp, dist_info=info)
        first = make_trainer(out_dir, ToyTask(batch=4), callbacks=[_stop_at(2)], **kw)
        try:
            first.fit()
        except Interrupt:
            pass
        resumed = make_trainer(out_dir, ToyTask(batch=4, init_seed=5), **kw)
        assert resumed.step == 2
        history = first.history + resumed.fit()
        params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
                  for p in resumed.params]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"history": history, "params": params, "world": info.world_size}, f)
    finally:
        torch.distributed.destroy_process_group()


def _run_two(tmp_path, fsdp):
    out = tmp_path / ("fsdp" if fsdp else "ddp")
    out.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(out), fsdp), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("single"), ToyTask(batch=8), max_steps=STEPS, checkpoint_every=2)
    history = trainer.fit()
    return history, [p.detach().flatten().tolist() for p in trainer.params]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_single_process(tmp_path, single, fsdp):
    ref_history, ref_params = single
    ranks = _run_two(tmp_path, fsdp)
    for r in ranks:
        assert r["world"] == 2
        assert [h["step"] for h in r["history"]] == list(range(STEPS))
        for a, b in zip(ref_history, r["history"]):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
        for a, b in zip(ref_params, r["params"]):
            torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=0)
    ckpt = tmp_path / ("fsdp" if fsdp else "ddp") / "checkpoint" / "train_state" / "state.json"
    meta = json.loads(ckpt.read_text())
    assert meta["rng_ranks"] == 2 and meta["meta"]["world_size"] == 2


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.distributed
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    average_gradients([p], 1)
    assert torch.equal(p.grad, torch.full((2,), 3.0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("cpu")


class BranchTask(ToyTask):
    """Micro-step j of an optimizer step uses branch j of the backbone only (another modality's projection);
    ``never`` is used by no micro-step on any rank and must keep grad=None (AdamW leaves it alone)."""

    def __init__(self, batch=4, accum=2, init_seed=0):
        super().__init__(batch=batch, accum=accum, init_seed=init_seed)
        torch.manual_seed(init_seed + 1)
        self.model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4),
                                          "never": torch.nn.Linear(4, 4)})
        self.model.forward = lambda x, branch: self.model[branch](x)

    def batches(self, start_step, rank, world_size):
        for i, batch in enumerate(super().batches(start_step, rank, world_size)):
            yield {**batch, "branch": "ab"[i % 2]}

    def loss(self, batch, step, ema):
        h = self.model(batch["x"], batch["branch"])  # (B, 4)
        loss = (self.objective(h) - batch["x"] @ self.target).square().mean()
        return loss, {"loss": loss.detach()}


def _branch_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        trainer = make_trainer(out_dir, BranchTask(batch=2), max_steps=3, accum_steps=2, ema=False, dist_info=info)
        assert trainer.sync.hooked is trainer.task.model  # DDP hooks on the backbone: all-reduce during backward
        history = trainer.fit()
        params = {k: v.flatten().tolist() for k, v in trainer.task.model.state_dict().items()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"history": history, "params": params}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_hooks_with_accumulation_and_unused_branches_match_one_process(tmp_path):
    # one process, 4 micro-batches of 2 rows == 2 ranks x 2 micro-batches of 2 rows (the same rows, same branches)
    single = make_trainer(tmp_path / "single", BranchTask(batch=2, accum=4), max_steps=3, accum_steps=4, ema=False)
    never_before = single.task.model["never"].weight.detach().clone()
    ref = single.fit()
    assert single.task.model["never"].weight.grad is None
    assert torch.equal(single.task.model["never"].weight, never_before)  # weight decay did not touch it
    out = tmp_path / "two"
    out.mkdir()
    mp.spawn(_branch_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    for r in range(2):
        got = json.loads((out / f"rank{r}.json").read_text())
        for a, b in zip(ref, got["history"]):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-6)
        for k, v in single.task.model.state_dict().items():
            torch.testing.assert_close(torch.tensor(got["params"][k]), v.flatten(), atol=1e-6, rtol=0)
