"""Procedural datasets: shapes, ranges, determinism, labels that match captions, speed, collate."""


import numpy as np
import pytest
import torch

from worldmodel.data import ProceduralAudio, ProceduralImages, ProceduralVideos, collate
from worldmodel.data.procedural_audio import CHORD_NAMES, PITCHES, RHYTHM_WORDS, TIMBRES
from worldmodel.data.procedural_images import COLOUR_NAMES, REGIONS, SHAPES, TEXTURES, region_index
from worldmodel.data.procedural_video import DIRECTIONS

MEDIA = [
    (ProceduralImages, {"size": 32, "length": 64}, "image", (3, 32, 32)),
    (ProceduralVideos, {"size": 16, "frames": 5, "length": 64}, "video", (5, 3, 16, 16)),
    (ProceduralAudio, {"sample_rate": 8000, "seconds": 0.25, "length": 64}, "audio", (2000,)),
]


@pytest.mark.parametrize("cls,kw,key,shape", MEDIA, ids=lambda v: getattr(v, "__name__", None))
def test_shapes_ranges_determinism(cls, kw, key, shape):
    ds = cls(**kw, seed=3)
    assert len(ds) == 64
    a, b = ds[5], cls(**kw, seed=3)[5]
    assert a[key].shape == shape and a[key].dtype == torch.float32
    assert a[key].min() >= -1 and a[key].max() <= 1 and a[key].std() > 0.05
    assert torch.equal(a[key], b[key]) and a["caption"] == b["caption"] and a["labels"] == b["labels"]
    assert not torch.equal(a[key], ds[6][key])  # different index, different sample
    assert not torch.equal(a[key], cls(**kw, seed=4)[5][key])  # different seed, different sample
    assert set(a["labels"]) == set(ds.label_names)
    for name, k in ds.num_classes.items():
        assert len(ds.class_names[name]) == k
        values = {ds[i]["labels"][name] for i in range(64)}
        assert values <= set(range(k)) and len(values) > 1, name
    assert torch.equal(ds[-1][key], ds[63][key])
    with pytest.raises(IndexError):
        ds[64]


def test_image_labels_match_caption_and_pixels():
    ds = ProceduralImages(size=32, length=200, seed=1)
    for i in range(200):
        s = ds[i]
        lab, cap = s["labels"], s["caption"]
        assert COLOUR_NAMES[lab["colour"]] in cap.split() and SHAPES[lab["shape"]] in cap.split()
        assert REGIONS[lab["region"]] in cap and region_index(lab["x"], lab["y"]) == lab["region"]
        if TEXTURES[lab["texture"]] != "plain":
            assert cap.split()[2] == {"striped": "striped", "checkered": "checkered", "dotted": "dotted"}[
                TEXTURES[lab["texture"]]]
        # The object's colour is at its centre (pixels there are the colour or its darker texture shade).
        img = (s["image"].numpy() + 1) / 2
        cx, cy = int(lab["x"] * 32), int(lab["y"] * 32)
        pixel = img[:, cy, cx]
        if SHAPES[lab["shape"]] != "triangle":  # a triangle's centroid is not its box centre, skip it
            from worldmodel.data.procedural_images import COLOUR_RGB

            rgb = COLOUR_RGB[lab["colour"]]
            assert np.allclose(pixel, rgb, atol=0.02) or np.allclose(pixel, rgb * 0.5, atol=0.02), (i, cap)
    captions = {ds[i]["caption"] for i in range(200)}
    assert len(captions) > 100  # diverse


def test_video_motion_matches_direction():
    ds = ProceduralVideos(size=32, frames=3, length=300, seed=0)
    checked = 0
    for i in range(300):
        s = ds[i]
        lab = s["labels"]
        assert DIRECTIONS[lab["direction"]] in s["caption"]
        assert ("fast" in s["caption"]) == (lab["speed"] >= 0.075)
        # Centre of mass of the object pixels (brighter than the dark background) moves along the direction.
        frames = (s["video"].numpy() + 1) / 2  # (T, 3, H, W)
        mask = frames.max(axis=1) > 0.3  # (T, H, W)
        yy, xx = np.mgrid[0:32, 0:32]
        centres = [(xx[m].mean(), yy[m].mean()) for m in mask]
        dx, dy = centres[1][0] - centres[0][0], centres[1][1] - centres[0][1]
        angle = lab["direction"] * np.pi / 4
        ex, ey = np.cos(angle), -np.sin(angle)
        bounced = not (0.25 < lab["x0"] < 0.75 and 0.25 < lab["y0"] < 0.75)
        if not bounced and lab["speed"] > 0.06:
            assert dx * ex + dy * ey > 0.5 * lab["speed"] * 32, (i, s["caption"], dx, dy)
            checked += 1
    assert checked > 30


def test_audio_labels_match_caption_and_spectrum():
    ds = ProceduralAudio(sample_rate=8000, seconds=0.5, length=100, seed=2)
    for i in range(100):
        s = ds[i]
        lab, cap = s["labels"], s["caption"]
        assert s["sample_rate"] == 8000
        assert f" {PITCHES[lab['pitch']]} " in cap and TIMBRES[lab["timbre"]] in cap
        assert RHYTHM_WORDS[lab["rhythm"]] in cap
        chord = CHORD_NAMES[lab["chord"]]
        assert {"single": "tone", "fifth": "power chord"}.get(chord, f"{chord} chord") in cap
        if chord == "single" and TIMBRES[lab["timbre"]] == "sine":
            spectrum = np.abs(np.fft.rfft(s["audio"].numpy()))
            peak_hz = np.argmax(spectrum) * 8000 / 4000
            assert abs(peak_hz - lab["frequency"]) < 5, (peak_hz, lab["frequency"])


def test_collate():
    batch = collate([ProceduralImages(length=8)[i] for i in range(4)])
    assert batch["modality"] == "image" and batch["image"].shape == (4, 3, 32, 32)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert batch["labels"]["shape"].dtype == torch.int64 and batch["labels"]["x"].dtype == torch.float32
    audio = collate([ProceduralAudio(seconds=0.1, length=4)[i] for i in range(3)])
    assert audio["audio"].shape == (3, 800) and audio["sample_rate"] == 8000
    with pytest.raises(ValueError, match="sample rates"):
        collate([ProceduralAudio(seconds=0.1, length=2)[0], ProceduralAudio(sample_rate=16000, seconds=0.1)[0]])
