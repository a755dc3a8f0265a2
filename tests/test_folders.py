"""Folder sources (images, videos, wav) and TFDS images: reading, captions, corrupt files, clear errors."""

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.data import AudioFolder, ImageFolder, VideoFolder, collate


def write_png(path, rgb, size=(40, 24)):
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.full((size[1], size[0], 3), rgb, dtype=np.uint8))


def write_wav(path, samples, rate):
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def test_image_folder_sidecar_classes_and_corrupt(tmp_path):
    write_png(tmp_path / "cats" / "a.png", (255, 0, 0))
    (tmp_path / "cats" / "a.txt").write_text("a red card\n")
    write_png(tmp_path / "dogs" / "b.jpg", (0, 0, 255))
    (tmp_path / "dogs" / "c.png").write_bytes(b"this is not a png")
    ds = ImageFolder(tmp_path, size=16, captions="sidecar")
    assert len(ds) == 3 and ds.num_classes == {"class": 2} and ds.class_names["class"] == ("cats", "dogs")
    with pytest.warns(UserWarning, match="c.png"):
        samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1 and ds.skipped_files[0].endswith("c.png")
    for s in samples:
        assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
        assert s["image"].min() >= -1 and s["image"].max() <= 1
    red = samples[0]
    assert red["caption"] == "a red card" and red["labels"] == {"class": 0}
    assert red["image"][0].mean() > 0.95 and red["image"][2].mean() < -0.95
    assert samples[1]["caption"] == "" and samples[1]["labels"] == {"class": 1}
    assert torch.equal(samples[2]["image"], samples[0]["image"])  # the bad index wrapped to the next good file
    [ds[2] for _ in range(3)]
    assert ds.skipped == 1  # counted once per file
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 16, 16) and batch["labels"]["class"].tolist() == [0, 1, 0]


def test_image_folder_jsonl(tmp_path):
    write_png(tmp_path / "x.png", (0, 255, 0), size=(30, 60))
    write_png(tmp_path / "sub" / "y.png", (9, 9, 9))
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        ImageFolder(tmp_path, captions="jsonl")
    rows = [{"file": "x.png", "caption": "green"}, {"file": "sub/y.png", "caption": "grey"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ImageFolder(tmp_path, size=8, captions="jsonl")
    assert [ds[i]["caption"] for i in range(2)] == ["grey", "green"]  # sorted: sub/y.png before x.png
    assert ImageFolder(tmp_path, size=8, captions=None)[0]["caption"] == ""
    (tmp_path / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        ImageFolder(tmp_path, captions="jsonl")


@pytest.mark.parametrize("cls", [ImageFolder, VideoFolder, AudioFolder])
def test_missing_and_empty_folders(tmp_path, cls):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cls(tmp_path / "nope")
    (tmp_path / "notes.md").write_text("nothing here")
    with pytest.raises(ValueError, match="no .* files"):
        cls(tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*skipping unreadable")
def test_video_folder_clips_and_corrupt(tmp_path):
    import imageio.v3 as iio

    frames = np.zeros((12, 32, 48, 3), dtype=np.uint8)
    for i in range(12):
        frames[i, :, :, 0] = i * 20  # red ramps up frame by frame
    iio.imwrite(tmp_path / "ramp.mp4", frames, plugin="pyav", codec="libx264", fps=10)
    (tmp_path / "ramp.txt").write_text("a red fade")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    with pytest.warns(UserWarning, match="broken.mp4"):
        ds = VideoFolder(tmp_path, frames=3, stride=2, size=16)
    assert ds.skipped == 1
    assert len(ds) == 2  # 12 frames // (3 * 2)
    first, second = ds[0], ds[1]
    assert first["video"].shape == (3, 3, 16, 16) and first["caption"] == "a red fade"
    reds = [((v[:, 0].mean(dim=(1, 2)) + 1) * 127.5).tolist() for v in (first["video"], second["video"])]
    assert np.allclose(reds[0], [0, 40, 80], atol=12) and np.allclose(reds[1], [120, 160, 200], atol=12)
    long = VideoFolder(tmp_path, frames=20, stride=1, size=8)[0]["video"]  # longer than the file: last frame repeats
    assert long.shape == (20, 3, 8, 8) and torch.equal(long[-1], long[11])


@pytest.mark.filterwarnings("ignore:.*skipping unreadable")
def test_audio_folder_resample_and_corrupt(tmp_path):
    t = np.arange(16000) / 16000
    write_wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 16000)  # 1 s at 16 kHz
    (tmp_path / "tone.txt").write_text("an A")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.warns(UserWarning, match="bad.wav"):
        ds = AudioFolder(tmp_path, sample_rate=8000, seconds=0.25)
    assert ds.skipped == 1 and len(ds) == 4
    s = ds[1]
    assert s["audio"].shape == (2000,) and s["sample_rate"] == 8000 and s["caption"] == "an A"
    assert abs(s["audio"].abs().max() - 0.5) < 0.03
    peak_hz = np.argmax(np.abs(np.fft.rfft(s["audio"].numpy()))) * 8000 / 2000
    assert abs(peak_hz - 440) < 8
    short = AudioFolder(tmp_path, sample_rate=8000, seconds=2.0)
    assert len(short) == 1 and short[0]["audio"].shape == (16000,) and short[0]["audio"][9000:].abs().max() == 0


def _tiny_tfds(tmp_path):
    """A prepared 5-image TFDS dataset (the last image is not a PNG)."""
    import io

    import tensorflow_datasets as tfds

    class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["red", "blue"]),
                "text": tfds.features.Text(),
            }), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                img = np.zeros((10, 14, 3), np.uint8)
                img[..., 0 if i % 2 == 0 else 2] = 255
                yield i, {"image": img, "label": i % 2, "text": f"number {i}"}
            yield 4, {"image": io.BytesIO(b"\x89PNG not really"), "label": 0, "text": "corrupt"}

    builder = TinyImages(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


@pytest.mark.needs_tf
def test_tfds_images_from_directory(tmp_path):
    from worldmodel.data import TFDSImages

    builder = _tiny_tfds(tmp_path)
    ds = TFDSImages(builder.data_dir, split="train", caption_key="label", size=8)
    assert len(ds) == 5 and ds.num_classes == {"label": 2} and ds.class_names["label"] == ("red", "blue")
    with pytest.warns(UserWarning, match="skipping unreadable"):
        samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1
    for s in samples:
        assert s["image"].shape == (3, 8, 8) and s["image"].min() >= -1 and s["image"].max() <= 1
        red = s["labels"]["label"] == 0
        assert s["caption"] == ("red" if red else "blue")
        assert s["image"][0 if red else 2].mean() > 0.95 and s["image"][2 if red else 0].mean() < -0.95
    text = TFDSImages(builder.data_dir, caption_key="text", size=8, max_examples=3)
    assert len(text) == 3 and all(c.startswith("number") or c == "corrupt" for c in text.captions)
    assert text.num_classes == {}
    with pytest.raises(ValueError, match="features are"):
        TFDSImages(builder.data_dir, image_key="pixels")
    with pytest.raises(ValueError, match="split"):
        TFDSImages(builder.data_dir, split="validation")
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        TFDSImages(tmp_path / "missing")


@pytest.mark.needs_tf
def test_tfds_images_skip_exactly_a_corrupt_record(tmp_path):
    import struct

    from worldmodel.data import TFDSImages

    builder = _tiny_tfds(tmp_path)
    (shard,) = sorted(Path(builder.data_dir).glob("*train.tfrecord*"))
    data = bytearray(shard.read_bytes())
    offset = 0
    for _ in range(2):  # skip records 0 and 1
        offset += 12 + struct.unpack("<Q", data[offset: offset + 8])[0] + 4
    data[offset + 20: offset + 36] = bytes(b ^ 0xFF for b in data[offset + 20: offset + 36])  # inside record 2
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"skipped 1 corrupt record\(s\).*1 in {shard}"):
        ds = TFDSImages(builder.data_dir, caption_key="text", size=8)
    assert ds.captions == ["number 0", "number 1", "number 3", "corrupt"]
