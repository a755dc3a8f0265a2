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


# ----------------------------------------------------------------------------- crash states of a save

def _resumable(path, step):
    state = _train_state()
    state.step = step
    config = {**_config(), "train_step": step}
    return save_checkpoint(path, {"model": nn.Linear(3, 2)}, config, train_state=state)


class Killed(BaseException):
    """A process killed mid-save: no cleanup handler runs."""


def _crash_on_call(monkeypatch, target, name, call):
    real, calls = getattr(target, name), []

    def crashing(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, crashing)


@pytest.mark.parametrize("where,call", [("replace", 1), ("replace", 2), ("replace", 3), ("rmtree", 1)])
def test_a_crash_at_every_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch, where, call):
    path = tmp_path / "checkpoint"
    _resumable(path, 3)
    # os.replace calls of the second save: path -> .old, .tmp -> path, .old -> trash; then trash is deleted
    _crash_on_call(monkeypatch, ck.os if where == "replace" else ck.shutil, where, call)
    with pytest.raises(Killed):
        _resumable(path, 6)
    monkeypatch.undo()
    found = ck.latest_checkpoint(path)  # every crash point here comes after .tmp was complete: step 6 survives
    assert found is not None and load_checkpoint(found, train_state=True).train_state.step == 6
    # the next save recovers and leaves exactly one directory
    _resumable(path, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert ck.checkpoint_step(path, train_state=True) == 9


def test_only_old_copy_is_found_and_never_deleted(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    _resumable(path, 3)
    path.rename(tmp_path / ".checkpoint.old")  # died between the two renames with no complete .tmp
    assert ck.latest_checkpoint(path) == tmp_path / ".checkpoint.old"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "_write_train_state", boom)  # the next save fails too
    with pytest.raises(RuntimeError, match="disk full"):
        _resumable(path, 6)
    found = ck.latest_checkpoint(path)
    assert found is not None and ck.checkpoint_step(found, train_state=True) == 3  # still there, still complete


def test_incomplete_tmp_and_half_deleted_copies_are_ignored(tmp_path):
    path = tmp_path / "checkpoint"
    _resumable(path, 3)
    tmp = tmp_path / ".checkpoint.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())  # killed before config.json
    assert ck.latest_checkpoint(path) == path
    (tmp / "config.json").write_text('{"kind": "worldmodel.pre')  # killed while writing config.json
    assert ck.latest_checkpoint(path) == path
    # only .old and a .tmp missing its train state: the .tmp cannot be resumed
    path.rename(tmp_path / ".checkpoint.old")
    (tmp / "config.json").write_text(json.dumps({**_config(), "train_step": 6}))
    assert ck.latest_checkpoint(tmp_path / "checkpoint") == tmp_path / ".checkpoint.old"


def test_damaged_files_are_named(tmp_path):
    path = _resumable(tmp_path / "ckpt", 3)
    (path / "stats.json").write_text('{"q01": [0.1, ')
    with pytest.raises(ValueError, match=r"stats\.json is not valid JSON"):
        load_checkpoint(path)
    (path / "stats.json").unlink()
    config = (path / "config.json").read_text()
    (path / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match=r"ckpt/config\.json is not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(config)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"aliases": json.dumps({"model.bias": "gone"})})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.bias' is recorded as an alias of 'gone'"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(path)


# ------------------------------------------------------------------------- what the Trainer does with them

class _Line:
    """A one-layer regression task for the Trainer; ``stop_at`` raises from the callback at that step."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Linear(2, 1)

    def modules(self):
        return {"model": self.model}

    def ema_target(self):
        return "model"

    def batches(self, start_step, rank, world_size):
        while True:
            x = torch.randn(4, 2, generator=torch.Generator().manual_seed(start_step))
            start_step += 1
            yield {"x": x}

    def loss(self, batch, step, ema):
        loss = (self.model(batch["x"]) - batch["x"].sum(1, keepdim=True)).square().mean()
        return loss, {"loss": loss.item()}


class _Stop(Exception):
    pass


def _trainer(tmp_path, stop_at=None, **overrides):
    from worldmodel.distributed import DistInfo
    from worldmodel.trainer import Trainer, TrainerConfig

    def stop(trainer, step):
        if step == stop_at:
            raise _Stop

    cfg = TrainerConfig(**{**dict(output_dir=str(tmp_path), max_steps=6, lr=1e-2, warmup_steps=1, checkpoint_every=3,
                                  log_every=1, eval_every=1, progress=False, device="cpu"), **overrides})
    return Trainer(_Line(), cfg, {"kind": "test.line"}, callbacks=[stop], dist_info=DistInfo())


def test_auto_resume_finds_the_copy_an_interrupted_save_left(tmp_path):
    with pytest.raises(_Stop):
        _trainer(tmp_path, stop_at=3).fit()  # the step-3 checkpoint is written before the callback raises
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")  # died between the two renames of a save
    resumed = _trainer(tmp_path)
    assert resumed.step == 3
    resumed.fit()
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["train_step"] == 6


def test_fresh_restart_rewrites_metrics_instead_of_appending(tmp_path):
    with pytest.raises(_Stop):
        _trainer(tmp_path, stop_at=2).fit()  # steps 1 and 2 logged, no checkpoint yet (checkpoint_every=3)
    assert not (tmp_path / "checkpoint").exists()
    _trainer(tmp_path).fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
