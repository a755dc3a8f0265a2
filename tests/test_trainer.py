"""The Trainer on a toy regression task: exact resume, gradient accumulation, lr schedule, logging, callbacks."""

import json

import pytest
import torch
from toy_training import KIND, Interrupt, ToyTask, _pretrain_task, _stop_at, make_trainer

from worldmodel.checkpoint import load_checkpoint
from worldmodel.distributed import DistInfo
from worldmodel.trainer import Trainer, TrainerConfig, lr_at

torch.set_num_threads(1)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", ToyTask(noise=True), eval_every=3)
    ref = full.fit()
    assert len(ref) == 6

    broken = make_trainer(tmp_path / "resumed", ToyTask(noise=True), eval_every=3, callbacks=[_stop_at(3)])
    with pytest.raises(Interrupt):
        broken.fit()  # the step-3 checkpoint is written before the callback raises
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "config.json").read_text())["train_step"] == 3

    # A fresh process: different init and RNG state; everything must come from the checkpoint.
    torch.manual_seed(1234)
    resumed = make_trainer(tmp_path / "resumed", ToyTask(noise=True, init_seed=7), eval_every=3)
    assert resumed.step == 3
    tail = resumed.fit()
    assert [r["step"] for r in tail] == [3, 4, 5]
    for a, b in zip(ref[3:], tail):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]  # bitwise on CPU
    for name in ("model", "objective"):
        for (k, p), q in zip(full.modules[name].state_dict().items(), resumed.modules[name].state_dict().values()):
            assert torch.equal(p, q), k
    for p, q in zip(full.ema.model.parameters(), resumed.ema.model.parameters()):
        assert torch.equal(p, q)
    # metrics.jsonl of the resumed run holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_equals_full_batch(tmp_path):
    one = make_trainer(tmp_path / "a", ToyTask(batch=8, accum=1), max_steps=2, accum_steps=1)
    two = make_trainer(tmp_path / "b", ToyTask(batch=4, accum=2), max_steps=2, accum_steps=2)
    ha, hb = one.fit(), two.fit()
    for a, b in zip(ha, hb):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)
    for p, q in zip(one.params, two.params):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_lr_schedule_warmup_peak_end(tmp_path):
    cfg = TrainerConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # first warmup step is lr / warmup
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # peak
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)  # floor
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))
    trainer = make_trainer(tmp_path, max_steps=4, warmup_steps=2, lr=0.5)
    assert [r["lr"] for r in trainer.fit()] == [lr_at(s, trainer.cfg) for s in range(4)]
    assert trainer.optimizer.param_groups[0]["lr"] == lr_at(3, trainer.cfg)


def test_outputs_metrics_plot_callbacks_and_checkpoint(tmp_path):
    calls = []
    trainer = make_trainer(tmp_path, max_steps=4, eval_every=2, log_every=2,
                           callbacks=[lambda t, s: calls.append((s, sorted(t.inference_modules())))])
    trainer.fit()
    assert calls == [(2, ["model", "objective"]), (4, ["model", "objective"])]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "flow/toy", "rep", "lr", "grad_norm", "steps_per_s"} <= set(records[0])
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "checkpoint", expected_kind=KIND, train_state=True)
    assert ckpt.config["model"] == {"width": 16} and ckpt.config["train_step"] == 4
    assert ckpt.extra_json == {"stats": {"mean": [0.0, 1.0]}}
    # model.safetensors holds the EMA weights of "model" and the raw weights of the others
    for k, v in trainer.ema.model.state_dict().items():
        assert torch.equal(ckpt.weights["model"][k], v)
    for k, v in trainer.task.objective.state_dict().items():
        assert torch.equal(ckpt.weights["objective"][k], v)
    for k, v in trainer.task.model.state_dict().items():
        assert torch.equal(ckpt.train_state.modules["model"][k], v)
    assert not torch.equal(ckpt.weights["model"]["0.weight"], ckpt.train_state.modules["model"]["0.weight"])
    # a finished run re-launched with resume="auto" does nothing more
    again = make_trainer(tmp_path, max_steps=4)
    assert again.step == 4 and again.fit() == []


def test_resume_refuses_other_kind_and_bad_config(tmp_path):
    make_trainer(tmp_path, max_steps=1).fit()
    cfg = TrainerConfig(output_dir=str(tmp_path), max_steps=2, progress=False, device="cpu")
    with pytest.raises(ValueError, match="written by 'test.toy', expected 'other.kind'"):
        Trainer(ToyTask(), cfg, {"kind": "other.kind"}, dist_info=DistInfo())
    with pytest.raises(ValueError, match="unknown trainer config key"):
        TrainerConfig.from_dict({"lr": 1e-3, "learning_rate": 1})
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp16")


def test_non_finite_loss_raises(tmp_path):
    task = ToyTask()
    task.loss = lambda batch, step, ema: (task.model(batch["x"]).sum() * float("nan"), {})
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        make_trainer(tmp_path, task, max_steps=1).fit()


def test_tiny_worldmodel_selfflow_train_save_resume(tmp_path):
    """The real tiny backbone + Self-Flow objective: 2 steps, save, resume to 3, same as 3 straight steps."""
    from worldmodel import selfflow, sizes
    from worldmodel.tokens import TokenSequence

    class TinyTask(ToyTask):  # ToyTask's modules() and ema_target(), the real backbone and objective
        def __init__(self):
            torch.manual_seed(0)
            self.model = sizes.build_model("tiny")
            self.objective = selfflow.SelfFlowObjective.for_model(self.model, selfflow.SelfFlowConfig())

        def batches(self, start_step, rank, world_size):
            step = start_step
            while True:
                g = torch.Generator().manual_seed(step)
                x = torch.randn(2, 16, self.model.token_dim["image"], generator=g)  # (B, N, C)
                yield {"x": x, "step": step}
                step += 1

        def loss(self, batch, step, ema):
            x = batch["x"]
            b, n, _ = x.shape
            pos = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
            seq = TokenSequence(x=x, tau=torch.zeros(b, n), pos=pos.reshape(n, 3), layout=(("image", n),),
                                loss_mask=torch.ones(b, n, dtype=torch.bool))
            return self.objective.loss(self.model, ema, seq, generator=torch.Generator().manual_seed(batch["step"]))

    kw = dict(max_steps=3, checkpoint_every=2, warmup_steps=1, lr=1e-3, ema_decay=0.999)
    straight = make_trainer(tmp_path / "a", TinyTask(), **kw).fit()
    with pytest.raises(Interrupt):
        make_trainer(tmp_path / "b", TinyTask(), eval_every=2, callbacks=[_stop_at(2)], **kw).fit()
    resumed = make_trainer(tmp_path / "b", TinyTask(), **kw)
    assert resumed.step == 2
    assert resumed.fit()[0]["loss"] == pytest.approx(straight[2]["loss"], abs=1e-6)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint", expected_kind=KIND)
    model = sizes.build_model("tiny")
    ckpt.load_into({"model": model})


def test_ema_covers_the_trained_text_encoder(tmp_path):
    """Backbone and text encoder both get EMA copies (the formula), saved as the inference weights, resumable."""
    task = _pretrain_task()
    names = ("model", "text_encoder")
    init = {n: {k: p.detach().clone() for k, p in task.modules()[n].named_parameters()} for n in names}
    live = []  # live weights after each optimizer step (callbacks run after the EMA update)

    def snapshot(trainer, step):
        live.append({n: {k: p.detach().clone() for k, p in trainer.modules[n].named_parameters()} for n in names})

    kw = dict(max_steps=3, warmup_steps=1, lr=1e-3, checkpoint_every=2, ema_decay=0.9)
    trainer = make_trainer(tmp_path / "a", task, callbacks=[snapshot], eval_every=1, **kw)
    trainer.fit()
    assert set(trainer.emas) == set(names) and trainer.ema is trainer.emas["model"]
    inference = trainer.inference_modules()
    assert inference["text_encoder"] is trainer.emas["text_encoder"].model
    assert task.text_encoder_for(trainer.ema.model) is inference["text_encoder"]  # the EMA pair for sampling / eval
    assert task.text_encoder_for(task.model) is task.text_encoder
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint", expected_kind=KIND)
    for name in names:
        expected = dict(init[name])
        for n, weights in enumerate(live):  # warmup: d_n = min(0.9, (1 + n) / (10 + n))
            d = min(0.9, (1 + n) / (10 + n))
            expected = {k: d * v + (1 - d) * weights[name][k] for k, v in expected.items()}
        ema = dict(trainer.emas[name].model.named_parameters())
        for k, v in expected.items():
            torch.testing.assert_close(ema[k], v, atol=1e-6, rtol=1e-5)
        assert any(not torch.equal(ema[k], live[-1][name][k]) for k in ema), name
        for k, v in trainer.emas[name].model.state_dict().items():  # model.safetensors holds the EMA weights
            assert torch.equal(ckpt.weights[name][k], v), (name, k)

    with pytest.raises(Interrupt):
        make_trainer(tmp_path / "b", _pretrain_task(), callbacks=[_stop_at(2)], eval_every=2, **kw).fit()
    resumed = make_trainer(tmp_path / "b", _pretrain_task(), **kw)
    resumed.fit()
    for name in names:
        for (k, p), q in zip(trainer.emas[name].model.state_dict().items(),
                             resumed.emas[name].model.state_dict().values()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{name} {k}")

    frozen = make_trainer(tmp_path / "c", _pretrain_task(train_text=False), max_steps=1)
    assert set(frozen.emas) == {"model"} and frozen.inference_modules()["text_encoder"] is frozen.task.text_encoder


def test_metrics_average_only_the_micro_steps_that_report_them(tmp_path):
    """flow/video is logged as the mean over the micro-steps whose batch has video loss tokens, not diluted."""
    from worldmodel.selfflow import SelfFlowConfig, SelfFlowObjective
    from worldmodel.sizes import build_model
    from worldmodel.tokens import TokenSequence

    present = [True, False, True, True]  # video loss tokens per micro-step: step 0 has 1 of 2, step 1 has 2 of 2
    reported = []

    class MixedTask:
        def __init__(self):
            torch.manual_seed(0)
            self.model = build_model("tiny")
            self.objective = SelfFlowObjective.for_model(self.model, SelfFlowConfig())

        def modules(self):
            return {"model": self.model, "objective": self.objective}

        def ema_target(self):
            return "model"

        def batches(self, start_step, rank, world_size):
            for micro in range(start_step * 2, 100):
                yield {"micro": micro, "x": torch.randn(2, 6, 48, generator=torch.Generator().manual_seed(micro))}

        def loss(self, batch, step, ema):
            x = batch["x"]
            loss_mask = torch.ones(2, 6, dtype=torch.bool)
            loss_mask[:, :4] = present[batch["micro"]]  # 4 video tokens (clean context when absent), 2 actions
            seq = TokenSequence(x=x, tau=torch.zeros(2, 6), pos=torch.zeros(6, 3), layout=(("video", 4), ("action", 2)),
                                loss_mask=loss_mask)
            loss, metrics = self.objective.loss(self.model, ema, seq, torch.Generator().manual_seed(batch["micro"]))
            reported.append(metrics)
            return loss, metrics

    make_trainer(tmp_path, MixedTask(), max_steps=2, accum_steps=2, log_every=2, warmup_steps=1, lr=1e-3).fit()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    videos = [float(m["flow/video"]) for m, p in zip(reported, present) if p]
    actions = [float(m["flow/action"]) for m in reported]
    assert all(torch.isnan(m["flow/video"]) for m, p in zip(reported, present) if not p)  # NaN = not reported
    assert record["flow/video"] == pytest.approx(sum(videos) / len(videos), rel=1e-6)
    assert record["flow/action"] == pytest.approx(sum(actions) / len(actions), rel=1e-6)
