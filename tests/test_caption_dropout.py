"""Caption dropout goes through worldmodel.text.drop_captions, in pretraining and in fine-tuning alike."""

import torch
from toy_training import _pretrain_task

import worldmodel.finetune as finetune
import worldmodel.pretrain as pretrain
from worldmodel.pretrain import collate_media
from worldmodel.text import drop_captions

torch.set_num_threads(1)


def _spy(calls):
    def drop_all(captions, rate, generator=None):
        calls.append((list(captions), rate))
        return [None] * len(captions)

    return drop_all


def test_pretraining_drops_captions_with_drop_captions(monkeypatch):
    calls = []
    monkeypatch.setattr(pretrain, "drop_captions", _spy(calls))
    task = _pretrain_task(caption_dropout=0.25)
    batch = collate_media([task.streams[0].dataset[i] for i in range(3)], "image")
    batch["micro_step"] = 0
    seq = task.build_sequence(batch, "cpu")
    assert calls == [(list(batch["caption"]), 0.25)]
    assert seq.text_drop.tolist() == [True, True, True]


def test_finetuning_drops_instructions_with_drop_captions(monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "drop_captions", _spy(calls))
    task = finetune.FinetuneTask.__new__(finetune.FinetuneTask)  # only the dropout part of sequence() is run here
    task.instruction_dropout, task.seed = 0.05, 0
    batch = {"instruction": ["pick the block", ""], "micro_step": 3}
    monkeypatch.setattr(finetune, "build_sequence", lambda *a, **k: _Seq())
    task.text_encoder_for = lambda model: _Text()
    task.codec = task.geometry = None
    task.use_state = False
    batch.update(context=torch.zeros(2), actions=torch.zeros(2), terminate=torch.zeros(2),
                 action_valid=torch.zeros(2))
    seq = task.sequence(batch, "policy", "cpu")
    assert calls == [(["pick the block", ""], 0.05)]
    assert seq.text_drop.tolist() == [True, True]
    calls.clear()
    assert task.sequence(batch, "policy", "cpu", drop_instructions=False).text_drop.tolist() == [False, True]
    assert calls == []


def test_drop_captions_rate_and_reproducibility():
    caps = [f"c{i}" for i in range(1000)]
    a = drop_captions(caps, 0.3, torch.Generator().manual_seed(1))
    assert a == drop_captions(caps, 0.3, torch.Generator().manual_seed(1))
    assert 250 < sum(c is None for c in a) < 350
    assert drop_captions(caps, 0.0) == caps


class _Text:
    def encode(self, captions, device=None):
        return torch.zeros(len(captions), 1, 2), torch.ones(len(captions), 1, dtype=torch.bool)


class _Seq:
    x = torch.zeros(1)

    def with_values(self, x, text_drop):
        return type("S", (), {"text_drop": text_drop})()
