"""The inference chunk sampler: the eager path is exactly ``sampling.sample``; the text/position context is
computed once per chunk; bf16 weights (the CUDA fast path) agree with fp32; CPU never compiles or captures."""

import copy

import torch

from worldmodel.action_modes import WindowLayout, build_sequence
from worldmodel.codecs import build_frame_codec
from worldmodel.fast_sampling import ChunkSampler
from worldmodel.sampling import sample
from worldmodel.sizes import build_model

torch.set_num_threads(1)
SHIFT = {"action": 7.4}


def _policy_seq(batch=2):
    codec = build_frame_codec("patch", patch=8)
    geometry = WindowLayout(2, 0, 1, 4)
    g = torch.Generator().manual_seed(0)
    context = torch.rand(batch, 2, 3, 16, 16, generator=g) * 2 - 1
    h = geometry.horizon
    text = torch.randn(batch, 5, 256, generator=g)
    seq = build_sequence("policy", codec, context, None, torch.zeros(batch, h, 7), torch.zeros(batch, h),
                         torch.ones(batch, h, dtype=torch.bool), geometry, text=text,
                         text_mask=torch.ones(batch, 5, dtype=torch.bool))
    return codec, seq


def _model(codec):
    torch.manual_seed(0)
    return build_model("tiny", token_dim={"video": codec.token_dim}).eval()


def test_eager_chunk_sampler_is_exactly_sample_with_the_context_prepared_once():
    codec, seq = _policy_seq()
    model = _model(codec)
    sampler = ChunkSampler(model, steps=5, modality_shift=SHIFT, compile=True)  # CPU: eager fp32 regardless
    assert not sampler.fast and not sampler.graph and next(model.parameters()).dtype == torch.float32
    calls = {"prepare": 0, "forward": 0}
    prepare, forward = model.prepare_context, model.forward

    def counting_prepare(*a, **k):
        calls["prepare"] += 1
        return prepare(*a, **k)

    def counting_forward(*a, **k):
        calls["forward"] += 1
        assert k.get("context") is not None  # every step reuses the chunk's context
        return forward(*a, **k)

    model.prepare_context, model.forward = counting_prepare, counting_forward
    got = sampler(seq, torch.Generator().manual_seed(4))
    assert calls == {"prepare": 1, "forward": 5}
    model.prepare_context, model.forward = prepare, forward
    ref = sample(model, seq, steps=5, generator=torch.Generator().manual_seed(4), modality_shift=SHIFT)
    assert torch.equal(got.x, ref.x) and torch.equal(got.tau, ref.tau)


def test_bf16_weights_agree_with_fp32():
    codec, seq = _policy_seq()
    model = _model(codec)
    fp32 = ChunkSampler(model, steps=4, modality_shift=SHIFT)(seq, torch.Generator().manual_seed(1))
    half = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = ChunkSampler(half, steps=4, modality_shift=SHIFT)(seq, torch.Generator().manual_seed(1))
    assert bf16.x.dtype == torch.float32  # results come back in the sequence's dtype
    acts = slice(-4, None)
    torch.testing.assert_close(bf16.x[:, acts], fp32.x[:, acts], atol=0.1, rtol=0.05)


def test_policy_compile_option_keeps_cpu_eager_fp32(tmp_path):
    import numpy as np

    from policies import SelfFlowPolicy
    from tests.test_policy import INSTR, _image, _make_policy

    ckpt = _make_policy(sampling_steps=2).save_pretrained(tmp_path / "ckpt")
    plain = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2)
    fast = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2, compile=True)
    assert not fast._chunk_sampler.fast and next(fast.model.parameters()).dtype == torch.float32
    obs = {"image": _image(), "instruction": INSTR, "seed": 3}
    np.testing.assert_array_equal(plain.predict_action_chunk(obs)["actions"], fast.predict_action_chunk(obs)["actions"])


def test_save_pretrained_of_a_bf16_policy_writes_float32_weights(tmp_path):
    """compile=True on CUDA casts the backbone to bf16 in place; forced here on CPU, as ChunkSampler does it."""
    import numpy as np
    import pytest
    from safetensors import safe_open

    from policies import SelfFlowPolicy
    from tests.test_policy import INSTR, _image, _make_policy

    policy = _make_policy(sampling_steps=2)
    policy.model.to(torch.bfloat16)  # what ChunkSampler(compile=True) does to a CUDA model
    with pytest.warns(UserWarning, match="upcast to float32"):
        ckpt = policy.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes <= {torch.float32, torch.int64, torch.bool} and torch.float32 in dtypes
    assert next(policy.model.parameters()).dtype == torch.bfloat16  # the running policy is left as it was
    loaded = SelfFlowPolicy.from_pretrained(ckpt, device="cpu", sampling_steps=2)
    for (name, p), q in zip(policy.model.state_dict().items(), loaded.model.state_dict().values()):
        assert q.dtype == torch.float32 and torch.equal(p.float(), q), name  # exactly the bf16 values, upcast
    obs = {"image": _image(), "instruction": INSTR, "seed": 3}
    np.testing.assert_allclose(loaded.predict_action_chunk(obs)["actions"], policy.predict_action_chunk(obs)["actions"],
                               atol=0.05, rtol=0.05)


def test_graph_replay_bookkeeping_on_cpu(monkeypatch):
    """The CUDA-graph path's static buffers, emulated on CPU: a replay re-runs the captured call on the static
    inputs (what a CUDA graph does); new inputs must be copied in, the output cloned, one capture per shape."""
    from worldmodel import fast_sampling

    captures = []

    def emulated_capture(fn, warmup=fast_sampling.WARMUP_RUNS):
        out = fn()
        captures.append(out.shape)
        return (lambda: out.copy_(fn())), out

    monkeypatch.setattr(fast_sampling, "capture_graph", emulated_capture)
    codec, first = _policy_seq()
    model = _model(codec).to(torch.bfloat16)  # as compile=True casts it on CUDA; inputs and noise stay fp32
    sampler = ChunkSampler(model, steps=3, modality_shift=SHIFT)
    sampler.graph = True  # as on CUDA
    g = torch.Generator().manual_seed(5)
    _, second = _policy_seq()
    second = second.with_values(second.x.flip(0), text=second.text * -1)  # other frames and text, same shapes
    noises = [torch.randn(first.x.shape, generator=g) for _ in range(2)]
    got_first = sampler(first, noise=noises[0])
    got_second = sampler(second, noise=noises[1])
    assert captures == [first.x.shape]  # one capture for the shape, replayed for the second call
    for seq, noise, got in ((first, noises[0], got_first), (second, noises[1], got_second)):
        ref = sample(model, seq, steps=3, noise=noise, factorize=True, modality_shift=SHIFT)
        assert got.x.dtype == torch.float32 and torch.isfinite(got.x).all()
        assert torch.equal(got.x, ref.x) and torch.equal(got.tau, ref.tau)  # got_first survived the replay
    _, other_batch = _policy_seq(batch=3)
    sampler(other_batch)
    assert len(captures) == 2


def test_a_failed_capture_falls_back_to_no_graph_with_a_warning(monkeypatch):
    import pytest

    from worldmodel import fast_sampling

    def failing_capture(fn, warmup=fast_sampling.WARMUP_RUNS):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(fast_sampling, "capture_graph", failing_capture)
    codec, seq = _policy_seq()
    model = _model(codec)
    sampler = ChunkSampler(model, steps=3, modality_shift=SHIFT)
    sampler.graph = True  # as on CUDA
    noise = torch.randn(seq.x.shape, generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="capture of the sampling loop failed"):
        got = sampler(seq, noise=noise)
    assert not sampler.graph and "operation not permitted" in sampler.graph_error
    ref = sample(model, seq, steps=3, noise=noise, factorize=True, modality_shift=SHIFT)
    assert torch.equal(got.x, ref.x)
    assert torch.equal(sampler(seq, noise=noise).x, ref.x)  # later calls: no graph, no new capture attempt
