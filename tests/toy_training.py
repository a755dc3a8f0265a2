"""Toy training helpers shared by the trainer tests (test_trainer, test_distributed, test_null_text)."""

import torch
from torch import nn

from worldmodel.distributed import DistInfo
from worldmodel.trainer import Trainer, TrainerConfig

KIND = "test.toy"


class ToyTask:
    """y = A x regression through an MLP ("model", EMA-tracked) and a linear head ("objective").

    Each optimizer step's global batch (batch * accum * world rows) depends only on the step, so any
    split into micro-batches / ranks sees the same data. ``noise`` adds global-RNG noise to the inputs,
    which only an exact RNG restore reproduces on resume.
    """

    def __init__(self, batch=8, accum=1, noise=False, ema_weight=0.1, init_seed=0):
        torch.manual_seed(init_seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Dropout(0.0), nn.Linear(16, 4))
        self.objective = nn.Linear(4, 3)
        self.batch, self.accum, self.noise, self.ema_weight = batch, accum, noise, ema_weight
        self.target = torch.randn(4, 3, generator=torch.Generator().manual_seed(99))

    def modules(self):
        return {"model": self.model, "objective": self.objective}

    def ema_target(self):
        return "model"

    def batches(self, start_step, rank, world_size):
        step = start_step
        while True:
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(self.batch * self.accum * world_size, 4, generator=g)  # (B_global, 4)
            chunks = x.chunk(self.accum * world_size)
            for j in range(self.accum):
                yield {"x": chunks[rank * self.accum + j]}
            step += 1

    def loss(self, batch, step, ema):
        x = batch["x"]
        if self.noise:
            x = x + 0.01 * torch.randn_like(x)
        h = self.model(x)  # (B, 4)
        flow = (self.objective(h) - x @ self.target).square().mean()
        rep = torch.zeros(())
        if ema is not None and self.ema_weight:
            rep = (h - ema(x).detach()).square().mean()
        loss = flow + self.ema_weight * rep
        return loss, {"loss": loss.item(), "flow/toy": flow.item(), "rep": rep.item()}


def make_trainer(tmp_path, task=None, callbacks=(), dist_info=None, **overrides):
    cfg = dict(output_dir=str(tmp_path), max_steps=6, lr=1e-2, warmup_steps=2, checkpoint_every=3, log_every=1,
               grad_clip=1.0, weight_decay=0.01, ema_decay=0.9, progress=False, device="cpu")
    cfg.update(overrides)
    return Trainer(task or ToyTask(), TrainerConfig(**cfg), {"kind": KIND, "model": {"width": 16}},
                   extra_json={"stats": {"mean": [0.0, 1.0]}}, callbacks=callbacks, dist_info=dist_info or DistInfo())


class Interrupt(Exception):
    pass


def _stop_at(step):
    def callback(trainer, s):
        if s == step:
            raise Interrupt

    return callback


def _pretrain_task(caption_dropout=0.0, train_text=True):
    """The real pretraining task at toy scale: tiny backbone, 1-layer byte text encoder, 16x16 images."""
    from worldmodel.codecs.patch import PatchCodec
    from worldmodel.data import ProceduralImages
    from worldmodel.pretrain import ModalityStream, PretrainTask
    from worldmodel.selfflow import SelfFlowConfig, SelfFlowObjective
    from worldmodel.sizes import build_model
    from worldmodel.text import ByteTextEncoder

    torch.manual_seed(0)
    text = ByteTextEncoder(dim=32, max_len=16, layers=1).requires_grad_(train_text)
    model = build_model("tiny", token_dim={"image": 48}, text_dim=32)
    objective = SelfFlowObjective.for_model(model, SelfFlowConfig())
    stream = ModalityStream("image", ProceduralImages(size=16, length=32), PatchCodec(4), batch_size=4, prob=1.0)
    return PretrainTask(model, objective, text, [stream], caption_dropout, seed=0)
