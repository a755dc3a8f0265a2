"""The unconditional text: dropped and blank captions train the backbone's null token that CFG samples with."""

import torch
from toy_training import _pretrain_task

from worldmodel.pretrain import collate_media
from worldmodel.selfflow import EMA
from worldmodel.sizes import build_model
from worldmodel.tokens import TokenSequence

torch.set_num_threads(1)


def test_blank_captions():
    from worldmodel.text import blank_captions

    assert blank_captions(["a red circle", "", None, "  \n"]).tolist() == [False, True, True, True]


def test_dropped_row_equals_text_none_and_kept_row_is_unchanged():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    b, n, length = 3, 6, 5
    x = torch.randn(b, n, 48)
    tau = torch.rand(b, n)
    pos = torch.zeros(n, 3)
    pos[:, 1] = torch.arange(n)
    text = torch.randn(b, length, 256)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 3:] = False  # padded caption
    seq = TokenSequence(x=x, tau=tau, pos=pos, layout=(("image", n),), loss_mask=torch.ones(b, n, dtype=torch.bool),
                        text=text, text_mask=mask)
    with torch.no_grad():
        dropped = model(seq.with_values(x, text_drop=torch.tensor([True, False, True]))).velocity  # (B, N, C)
        null = model(seq.with_values(x, text=None, text_mask=None)).velocity
        cond = model(seq).velocity
    torch.testing.assert_close(dropped[[0, 2]], null[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[1], cond[1], atol=1e-5, rtol=1e-5)
    assert (null[1] - cond[1]).abs().max() > 1e-4  # the check has power: the text does condition the output


def test_caption_dropout_trains_the_null_text():
    task = _pretrain_task(caption_dropout=0.5)
    stream = task.streams[0]
    batch = collate_media([stream.dataset[i] for i in range(4)], "image")
    batch["caption"][0] = " "  # a blank caption is the unconditional text too
    batch["micro_step"] = 0
    seq = task.build_sequence(batch, "cpu")
    # blank row 0; rows 1 and 3 dropped at rate 0.5 (draw_generator(0, "caption_dropout", 0, 0) in worldmodel.rng)
    assert seq.text_drop.tolist() == [True, True, False, True]
    loss, _ = task.loss(batch, 0, EMA(task.model).model)
    loss.backward()
    grad = task.model.null_text.grad
    assert grad is not None and grad.abs().sum() > 0
