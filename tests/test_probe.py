"""Linear probes: planted signals are recovered, noise is at chance, features of the real tiny model per block,
and the checkpoint -> report path including the Hydra script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worldmodel.builders import PRETRAIN_KIND
from worldmodel.checkpoint import save_checkpoint
from worldmodel.codecs.patch import AudioPatchCodec, PatchCodec
from worldmodel.data import ProceduralAudio, ProceduralImages
from worldmodel.probe import (
    ProbeResult,
    extract_features,
    fit_linear_probes,
    probe_checkpoint,
    write_report,
)
from worldmodel.sizes import build_model
from worldmodel.text import ByteTextEncoder

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def planted(samples=600, dim=24, classes=4, seed=0):
    """Block 0 holds the labels linearly (plus noise); block 1 is pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (samples,), generator=g)
    z = torch.rand(samples, generator=g) * 2 - 1
    mix = torch.randn(classes + 1, dim, generator=g)
    signal = torch.cat([torch.nn.functional.one_hot(y, classes).double(), z[:, None].double()], 1) @ mix.double()
    feats = {0: signal + 0.05 * torch.randn(samples, dim, generator=g, dtype=torch.float64),
             1: torch.randn(samples, dim, generator=g, dtype=torch.float64)}
    return feats, {"cls": y, "cont": z}


def test_planted_signal_recovered_and_noise_at_chance():
    feats, labels = planted()
    res = fit_linear_probes(feats, labels, train_frac=0.75, seed=0)
    assert res.metric == {"cls": "accuracy", "cont": "r2"}
    assert res.n_train == 450 and res.n_test == 150
    assert res.scores[0]["cls"] > 0.97 and res.scores[0]["cont"] > 0.95
    assert res.chance["cls"] < 0.4  # 4 balanced classes
    assert res.scores[1]["cls"] < res.chance["cls"] + 0.15  # random features: chance level
    assert res.scores[1]["cont"] < 0.15
    assert res.best("cls")[0] == 0
    again = fit_linear_probes(feats, labels, train_frac=0.75, seed=0)
    assert again.scores == res.scores  # deterministic
    assert ProbeResult.from_dict(json.loads(json.dumps(res.to_dict()))).scores == res.scores


def test_probe_input_errors():
    feats, labels = planted(samples=40)
    with pytest.raises(ValueError, match="disagree"):
        fit_linear_probes(feats, {"cls": labels["cls"][:30]})
    with pytest.raises(ValueError, match="train_frac"):
        fit_linear_probes(feats, labels, train_frac=1.0)
    model = build_model("tiny", token_dim={"image": 48})
    data = ProceduralImages(size=16, length=8)
    with pytest.raises(ValueError, match="text_encoder"):
        extract_features(model, PatchCodec(4), data, "image", 8, text="empty")
    with pytest.raises(ValueError, match="exceeds"):
        extract_features(model, PatchCodec(4), data, "image", 9, text="none")
    with pytest.raises(ValueError, match="not 'audio'"):
        extract_features(model, PatchCodec(4), data, "audio", 8, text="none")


def test_extract_features_real_tiny_model():
    torch.manual_seed(0)
    text = ByteTextEncoder(dim=32, max_len=16, layers=1)
    model = build_model("tiny", token_dim={"image": 48, "audio": 64}, text_dim=32)
    images = ProceduralImages(size=16, length=50, seed=5)
    feats, labels = extract_features(model, PatchCodec(4), images, "image", 12, text="empty", text_encoder=text,
                                     batch_size=5)
    assert sorted(feats) == list(range(model.num_blocks))
    assert all(f.shape == (12, model.hidden_size) and f.dtype == torch.float32 for f in feats.values())
    assert set(labels) == set(images.label_names) and labels["shape"].dtype == torch.int64
    assert labels["x"].dtype == torch.float32 and all(len(v) == 12 for v in labels.values())
    assert not torch.allclose(feats[0], feats[model.num_blocks - 1])
    again, _ = extract_features(model, PatchCodec(4), images, "image", 12, text="empty", text_encoder=text,
                                batch_size=12)
    assert torch.allclose(again[1], feats[1], atol=1e-5)  # batching does not change the features
    noisy, _ = extract_features(model, PatchCodec(4), images, "image", 12, tau=0.3, blocks=[1], text="none")
    assert list(noisy) == [1] and not torch.allclose(noisy[1], feats[1])
    audio = ProceduralAudio(sample_rate=2000, seconds=0.25, length=20)
    afeats, alabels = extract_features(model, AudioPatchCodec(64), audio, "audio", 6, blocks=[0, 3], text="none")
    assert sorted(afeats) == [0, 3] and afeats[3].shape == (6, model.hidden_size) and "pitch" in alabels


def fake_pretrain_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    text = ByteTextEncoder(dim=32, max_len=16)  # what builders.build_text rebuilds from run["text"] (2 layers)
    model = build_model("tiny", token_dim={"image": 48, "video": 48, "audio": 64}, text_dim=32)
    run = {"text": {"encoder": "byte", "dim": 32, "max_len": 16, "path": None},
           "codec": {"frames": "patch", "patch": 4, "frames_path": None, "audio": "patch", "audio_frame": 64,
                     "audio_path": None},
           "data": {"name": "procedural", "seed": 0, "length": 1000, "image_size": 16, "video_size": 16,
                    "video_frames": 2, "sample_rate": 2000, "audio_seconds": 0.25},
           "objective": {"name": "selfflow", "mask_ratio": {"image": 0.25}, "gamma": 0.8, "student_block": None,
                         "teacher_block": None, "timesteps": {"kind": "uniform"}}, "model": {"size": "tiny"}}
    return save_checkpoint(path / "checkpoint", {"model": model, "text_encoder": text},
                           {"kind": PRETRAIN_KIND, "model": model.config, "run": run})


@pytest.mark.slow
def test_probe_checkpoint_and_report(tmp_path):
    fake_pretrain_checkpoint(tmp_path / "a", 0)
    fake_pretrain_checkpoint(tmp_path / "b", 1)
    results = {name: probe_checkpoint(tmp_path / name, "image", num_samples=60, batch_size=30)  # run dir resolves
               for name in ("a", "b")}
    res = results["a"]
    assert sorted(res.scores) == [0, 1, 2, 3] and res.n_test == 12
    assert res.metric["shape"] == "accuracy" and res.metric["size"] == "r2"
    assert res.meta["modality"] == "image" and (res.meta["student_block"], res.meta["teacher_block"]) == (0, 2)
    assert all(0.0 <= s["shape"] <= 1.0 for s in res.scores.values())
    paths = write_report(results, tmp_path / "report", stem="probe_image", title="t")
    assert paths["png"].stat().st_size > 1000
    assert "| block | a | b |" in paths["md"].read_text()
    assert set(json.loads(paths["json"].read_text())) == {"a", "b"}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        probe_checkpoint(tmp_path / "missing")


@pytest.mark.slow
def test_script_writes_report(tmp_path):
    ckpt = fake_pretrain_checkpoint(tmp_path / "run", 0)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "probe.py"), f"checkpoints=[{ckpt},{tmp_path / 'run'}]",
           "names=[selfflow,flow_matching]", "modalities=[audio]", "num_samples=24", "blocks=[0,3]", "device=cpu",
           "threads=1", f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "probe_audio.json").read_text())
    assert set(data) == {"selfflow", "flow_matching"} and set(data["selfflow"]["scores"]) == {"0", "3"}
    assert data["selfflow"]["scores"] == data["flow_matching"]["scores"]  # same checkpoint, same numbers
    assert (out / "probe_audio.png").exists() and "pitch" in (out / "probe_audio.md").read_text()
