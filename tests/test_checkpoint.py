"""Checkpoint directories: exact round trips, tied weights, atomic writes, strict and partial loading."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import worldmodel.checkpoint as ck
from worldmodel.checkpoint import (
    TrainState,
    load_checkpoint,
    load_state_strict,
    load_weights_partial,
    pack_tree,
    save_checkpoint,
    unpack_tree,
)

torch.set_num_threads(1)


class Tied(nn.Module):
    """An embedding tied to the output layer, a non-contiguous buffer, and a bf16 parameter."""

    def __init__(self, vocab=10, width=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.register_buffer("table", torch.arange(24.0).reshape(4, 6).t())  # (6, 4) non-contiguous view
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))


def _config(kind="worldmodel.pretrain"):
    return {"kind": kind, "model": {"size": "tiny"}, "note": "free metadata"}


def _train_state():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.arange(5)}
    return TrainState(step=7, modules={"model": model.state_dict()}, optimizer=opt.state_dict(),
                      rng=[rng, rng], meta={"scheduler": {"step": 7}})


def test_round_trip_exact_with_tied_weights_and_extra_json(tmp_path):
    torch.manual_seed(0)
    model, head = Tied(), nn.Linear(6, 2)
    path = save_checkpoint(tmp_path / "ckpt", {"model": model, "head": head}, _config(),
                           extra_json={"action_stats": {"p01": [-1.0, 0.5], "p99": [2.0, 3.0]}},
                           train_state=_train_state())
    assert sorted(p.name for p in path.iterdir()) == ["action_stats.json", "config.json", "model.safetensors",
                                                        "train_state"]
    ckpt = load_checkpoint(path, expected_kind="worldmodel.pretrain", train_state=True)
    assert ckpt.config == _config() and ckpt.kind == "worldmodel.pretrain"
    assert ckpt.extra_json["action_stats"] == {"p01": [-1.0, 0.5], "p99": [2.0, 3.0]}
    torch.manual_seed(1)
    fresh, fresh_head = Tied(), nn.Linear(6, 2)
    ckpt.load_into({"model": fresh, "head": fresh_head})
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == b.dtype, k
    assert fresh.out.weight is fresh.embed.weight  # still tied after loading
    assert torch.equal(fresh_head.weight, head.weight)

    state = ckpt.train_state
    ref = _train_state()
    assert state.step == 7 and state.meta == {"scheduler": {"step": 7}} and len(state.rng) == 2
    assert torch.equal(state.rng[1]["numpy_keys"], torch.arange(5))
    opt = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=1e-3)
    opt.load_state_dict(state.optimizer)  # structure (int keys, tuples, tensors) survives JSON
    assert state.optimizer["param_groups"][0]["betas"] == ref.optimizer["param_groups"][0]["betas"]
    assert set(state.optimizer["state"]) == {0, 1}
    # no pickle anywhere: every file is JSON or safetensors
    files = [p for p in path.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors") for p in files)


def test_pack_tree_round_trip():
    rng = np.random.RandomState(3).get_state()
    tree = {"a": (1, 2.5, None, "s"), 3: [torch.ones(2), {"b": True}], "np": rng[1], "nan": float("inf")}
    tensors = {}
    packed = pack_tree(tree, tensors)
    out = unpack_tree(json.loads(json.dumps(packed)), tensors)
    assert out["a"] == (1, 2.5, None, "s") and out[3][1] == {"b": True} and out["nan"] == float("inf")
    assert torch.equal(out[3][0], torch.ones(2))
    assert out["np"].dtype == np.uint32 and np.array_equal(out["np"], rng[1])
    with pytest.raises(ValueError, match="without pickle"):
        pack_tree({"x": object()}, {})


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    first = nn.Linear(3, 2)
    save_checkpoint(path, {"model": first}, _config(), train_state=_train_state())
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "_write_train_state", boom)  # fails after weights and config were written
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"model": nn.Linear(3, 2)}, _config(), train_state=_train_state())
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before  # the previous checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written dir left behind
    load_state_strict(nn.Linear(3, 2), load_checkpoint(path).weights["model"])

    monkeypatch.undo()  # a later save succeeds and replaces it
    second = nn.Linear(3, 2)
    save_checkpoint(path, {"model": second}, _config())
    assert torch.equal(load_checkpoint(path).weights["model"]["weight"], second.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_rename_points_to_backup(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"model": nn.Linear(3, 2)}, _config())
    path.rename(tmp_path / ".ckpt.old")  # as if the process died between the two renames
    with pytest.raises(FileNotFoundError, match="complete previous copy"):
        load_checkpoint(path)


def test_wrong_kind_and_missing_files(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"model": nn.Linear(3, 2)}, _config("worldmodel.pretrain"))
    with pytest.raises(ValueError, match="written by 'worldmodel.pretrain', expected 'worldmodel.finetune_rt1'"):
        load_checkpoint(path, expected_kind="worldmodel.finetune_rt1")
    load_checkpoint(path, expected_kind=("worldmodel.finetune_rt1", "worldmodel.pretrain"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cannot be resumed"):
        load_checkpoint(path, train_state=True)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="'kind' string"):
        save_checkpoint(tmp_path / "x", {"model": nn.Linear(3, 2)}, {"model": {}})


def test_strict_loading_names_keys(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"model": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))}, _config())
    ckpt = load_checkpoint(path)
    with pytest.raises(ValueError, match=r"shape mismatch 1.weight: checkpoint \(2, 4\) vs model \(5, 4\)"):
        ckpt.load_into({"model": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))})
    with pytest.raises(ValueError, match=r"missing keys \['2.weight', '2.bias'\]"):
        ckpt.load_into({"model": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))})
    with pytest.raises(ValueError, match=r"unexpected keys \['1.bias', '1.weight'\]"):
        ckpt.load_into({"model": nn.Sequential(nn.Linear(3, 4))})
    with pytest.raises(ValueError, match=r"no weights for module\(s\) \['text_encoder'\]"):
        ckpt.load_into({"text_encoder": nn.Linear(1, 1)})


def test_load_weights_partial_allows_only_named_new_heads():
    src = nn.ModuleDict({"body": nn.Linear(3, 4), "head_image": nn.Linear(4, 2)})
    dst = nn.ModuleDict({"body": nn.Linear(3, 4), "head_image": nn.Linear(4, 2), "head_action": nn.Linear(4, 7)})
    init = dst.head_action.weight.detach().clone()
    left = load_weights_partial(dst, src.state_dict(), allow_missing_prefixes=("head_action.",))
    assert left == ["head_action.weight", "head_action.bias"]
    assert torch.equal(dst.body.weight, src.body.weight) and torch.equal(dst.head_action.weight, init)
    with pytest.raises(ValueError, match="missing keys"):
        load_weights_partial(dst, src.state_dict(), allow_missing_prefixes=("head_video.",))
    bad = dict(src.state_dict())
    bad["body.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"body.weight: checkpoint \(5, 3\) vs model \(4, 3\)"):
        load_weights_partial(dst, bad, allow_missing_prefixes=("head_action.",))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_weights_partial(nn.ModuleDict({"body": nn.Linear(3, 4)}), src.state_dict())
