"""Codecs: exact patch round trips, positions, autoencoders that learn, save/load, a local diffusers VAE."""

import pytest
import torch

from worldmodel.codecs import (
    AudioAutoencoder,
    AudioLatentCodec,
    AudioPatchCodec,
    ConvAutoencoder,
    LatentCodec,
    PatchCodec,
    build_audio_codec,
    build_frame_codec,
)
from worldmodel.data import ProceduralAudio, ProceduralImages, collate

torch.set_num_threads(2)


def test_patch_codec_image_roundtrip_and_positions():
    codec = PatchCodec(patch=4)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    tokens, pos = codec.encode(x)
    assert codec.token_dim == 48 and tokens.shape == (2, 4 * 6, 48) and pos.shape == (24, 3)
    assert torch.equal(codec.decode(tokens, x.shape), x)
    assert (pos[:, 0] == 0).all() and pos[:, 1].max() == 3 and pos[:, 2].max() == 5
    # token k holds the 4x4 patch at (row, col) = pos[k, 1:], channels innermost
    k = 7
    r, c = int(pos[k, 1]), int(pos[k, 2])
    patch = x[0, :, 4 * r: 4 * r + 4, 4 * c: 4 * c + 4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[0, k], patch)
    assert codec.num_tokens(x.shape) == 24
    with pytest.raises(ValueError, match="multiple of patch"):
        codec.encode(torch.zeros(1, 3, 10, 16))
    with pytest.raises(ValueError, match="expects"):
        codec.encode(torch.zeros(1, 1, 16, 16))


def test_patch_codec_video_time_positions():
    codec = PatchCodec(patch=2)
    x = torch.randn(3, 5, 3, 4, 6)
    tokens, pos = codec.encode(x)
    assert tokens.shape == (3, 5 * 2 * 3, 12)
    assert torch.equal(codec.decode(tokens, x.shape), x)
    assert pos[:, 0].tolist() == [t for t in range(5) for _ in range(6)]
    # tokens of frame t are exactly the patches of that frame alone
    frame_tokens, _ = codec.encode(x[:, 2])
    assert torch.equal(tokens[:, 12:18], frame_tokens)


def test_audio_patch_codec():
    codec = AudioPatchCodec(frame=64)
    x = torch.randn(2, 1000)
    tokens, pos = codec.encode(x)
    assert tokens.shape == (2, 16, 64) and codec.token_dim == 64
    assert pos[:, 0].tolist() == list(range(16)) and (pos[:, 1:] == 0).all()
    assert torch.equal(codec.decode(tokens, x.shape), x)
    assert (tokens[:, -1, 1000 - 15 * 64:] == 0).all()  # zero padding at the end


def train(model, batches, steps, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        loss = model.reconstruction_loss(batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_conv_autoencoder_learns_saves_and_codes(tmp_path):
    torch.manual_seed(0)
    data = ProceduralImages(size=16, length=64)
    batches = [collate([data[i] for i in range(b * 16, b * 16 + 16)]) for b in range(4)]
    ae = ConvAutoencoder(latent_channels=4, width=16, downsample=4)
    losses = train(ae, batches, 40)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert torch.equal(ae.scale, torch.tensor(1.0))
    scale = ae.fit_scale(batches[0])
    with torch.no_grad():
        z = ae.encode_latents(batches[0]["image"])
    assert z.shape == (16, 4, 4, 4) and abs(float(z.std()) - 1) < 0.05 and scale != 1.0
    ae.save(tmp_path / "ae")
    codec = build_frame_codec("conv_ae", path=str(tmp_path / "ae"))
    assert isinstance(codec, LatentCodec) and codec.token_dim == 4
    images = batches[1]["image"]
    tokens, pos = codec.encode(images)
    assert tokens.shape == (16, 16, 4) and pos.shape == (16, 3)
    with torch.no_grad():
        assert torch.allclose(codec.decode(tokens, images.shape), ae.eval()(images), atol=1e-5)
    video = images.reshape(4, 4, 3, 16, 16)
    vt, vpos = codec.encode(video)
    assert vt.shape == (4, 64, 4) and vpos[:, 0].max() == 3
    assert torch.allclose(vt.reshape(16, 16, 4), tokens, atol=1e-5)  # frame by frame, same latents
    assert codec.decode(vt, video.shape).shape == video.shape
    # the loaded module equals the saved one exactly
    again = ConvAutoencoder.load(tmp_path / "ae")
    for (k, a), (_, b) in zip(ae.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ConvAutoencoder.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not a AudioAutoencoder"):
        AudioAutoencoder.load(tmp_path / "ae")


@pytest.mark.slow
def test_audio_autoencoder_learns_and_codes(tmp_path):
    torch.manual_seed(0)
    data = ProceduralAudio(sample_rate=8000, seconds=0.128, length=64)
    batches = [collate([data[i] for i in range(b * 16, b * 16 + 16)]) for b in range(4)]
    ae = AudioAutoencoder(latent_channels=8, width=16, downsample=16)
    losses = train(ae, batches, 40)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    ae.fit_scale(batches[0])
    ae.save(tmp_path / "aae")
    codec = build_audio_codec("audio_ae", path=str(tmp_path / "aae"), latent_frame=2)
    assert isinstance(codec, AudioLatentCodec) and codec.token_dim == 16
    audio = batches[2]["audio"][:, :1000]  # padded to 1024 = 64 latent steps = 32 tokens of 2 steps
    tokens, pos = codec.encode(audio)
    assert tokens.shape == (16, 32, 16) and pos[:, 0].tolist() == list(range(32))
    assert codec.decode(tokens, audio.shape).shape == (16, 1000)


def test_build_codec_errors():
    assert isinstance(build_frame_codec("patch", patch=2), PatchCodec)
    assert isinstance(build_audio_codec("patch", frame=32), AudioPatchCodec)
    with pytest.raises(ValueError, match="choose one of"):
        build_frame_codec("jpeg")
    with pytest.raises(ValueError, match="frames_path"):
        build_frame_codec("conv_ae")


@pytest.mark.slow
def test_diffusers_vae_from_local_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from worldmodel.codecs import DiffusersVAE

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiffusersVAE.from_folder(tmp_path / "vae")
    assert loaded.downsample == 2 and loaded.latent_channels == 4 and loaded.scaling_factor == 0.5
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * 0.5
    assert torch.allclose(loaded.encode_latents(x), expected, atol=1e-5)
    codec = build_frame_codec("diffusers", path=str(tmp_path / "vae"))
    tokens, pos = codec.encode(x)
    assert codec.token_dim == 16 and tokens.shape == (2, 16, 16) and pos[:, 1:].max() == 3
    out = codec.decode(tokens, x.shape)
    with torch.no_grad():
        assert torch.allclose(out, vae.decode(expected / 0.5).sample, atol=1e-5)
    video = torch.rand(1, 3, 3, 16, 16) * 2 - 1
    vt, vpos = codec.encode(video)
    assert vt.shape == (1, 48, 16) and codec.decode(vt, video.shape).shape == video.shape
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        DiffusersVAE.from_folder(tmp_path / "empty")
