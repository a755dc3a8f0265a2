"""Text encoders: shapes, masks, padding invariance, training, caption dropout, a local frozen encoder."""

import pytest
import torch

from worldmodel.text import ByteTextEncoder, TextEncoder, build_text_encoder, drop_captions

torch.set_num_threads(2)


def test_byte_encoder_shapes_and_masks():
    torch.manual_seed(0)
    enc = ByteTextEncoder(dim=64, max_len=16, layers=2)
    assert isinstance(enc, TextEncoder) and enc.feature_dim == 64
    caps = ["a red circle", "", None, "é" * 20]
    feats, mask = enc.encode(caps, device="cpu")
    assert feats.shape == (4, 16, 64) and feats.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [13, 1, 1, 16]  # BOS + bytes, truncated at max_len (é is 2 bytes)
    assert (feats[~mask] == 0).all() and torch.isfinite(feats).all()
    assert torch.equal(feats[1], feats[2])  # "" and None are both the unconditional text
    # A caption's features do not depend on what else is in the batch (padding is masked out).
    alone, _ = enc.encode(["a red circle"])
    assert torch.allclose(alone[0], feats[0], atol=1e-5)
    assert not torch.allclose(feats[0], enc.encode(["a blue circle"])[0][0])


def test_byte_encoder_trains():
    torch.manual_seed(0)
    enc = ByteTextEncoder(dim=32, max_len=24, layers=1)
    head = torch.nn.Linear(32, 2)
    caps = ["a red square", "a blue square", "a red circle", "a blue circle"]
    target = torch.tensor([0, 1, 0, 1])  # colour
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        feats, mask = enc.encode(caps)
        pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(head(pooled), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_drop_captions():
    caps = [f"c{i}" for i in range(1000)]
    out = drop_captions(caps, 0.25, torch.Generator().manual_seed(0))
    dropped = sum(c is None for c in out)
    assert 180 < dropped < 320
    assert all(o is None or o == c for o, c in zip(out, caps))
    assert out == drop_captions(caps, 0.25, torch.Generator().manual_seed(0))
    assert drop_captions(caps[:5], 0.0) == caps[:5] and drop_captions(caps[:5], 1.0) == [None] * 5
    with pytest.raises(ValueError, match="dropout"):
        drop_captions(caps, 1.5)


def test_registry():
    enc = build_text_encoder("byte", dim=32, max_len=8, layers=1)
    assert isinstance(enc, ByteTextEncoder) and enc.encode(["x"])[0].shape == (1, 8, 32)
    with pytest.raises(ValueError, match="choose one of"):
        build_text_encoder("clip")
    with pytest.raises(ValueError, match="needs `path`"):
        build_text_encoder("sentence")


def test_frozen_sentence_encoder_from_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from worldmodel.text import FrozenSentenceEncoder

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    enc = build_text_encoder("sentence", dim=32, max_len=12, path=str(tmp_path / "bert"))
    assert isinstance(enc, FrozenSentenceEncoder) and isinstance(enc, TextEncoder) and enc.feature_dim == 32
    feats, mask = enc.encode(["a red circle", None])
    assert feats.shape == (2, 12, 32) and mask.sum(1).tolist() == [5, 2]  # [CLS] a red circle [SEP]; [CLS] [SEP]
    assert (feats[~mask] == 0).all()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert torch.equal(enc.encode(["a red circle"])[0][0], feats[0])  # eval mode kept: deterministic
    with pytest.raises(ValueError, match="text.dim=32"):
        build_text_encoder("sentence", dim=64, path=str(tmp_path / "bert"))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        FrozenSentenceEncoder.from_folder(tmp_path / "missing")
