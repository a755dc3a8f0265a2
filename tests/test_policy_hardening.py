"""Issue 16 items 1-2: bounded cost per request and no silent wrong actions, in-process and through the server."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_doubles import INSTR, LinePolicy, _image, _make_policy

from policies.client import PolicyClient, PolicyServerError
from policies.selfflow_policy import SelfFlowPolicy, preprocess_frames
from policies.serve import PolicyServer
from policies.validation import Limits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy():
    return _make_policy(sampling_steps=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, policy):
    return Path(policy.save_pretrained(tmp_path_factory.mktemp("hardening") / "ckpt"))


# ------------------------------------------------------------------ item 1: bounded cost per request
def test_small_frames_are_cropped_before_any_upscale(monkeypatch):
    sizes, interpolate = [], torch.nn.functional.interpolate

    def recording(x, size=None, **kw):
        sizes.append(tuple(size))
        return interpolate(x, size=size, **kw)

    monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
    out = preprocess_frames(_image((8, 64, 3)), 32, 40, "cpu")  # 8 rows: upscaled x4, much wider than needed
    assert out.shape == (1, 1, 3, 32, 40) and float(out.abs().max()) <= 1
    assert sizes and all(h * w <= 32 * 40 for h, w in sizes), sizes  # never an upscaled copy of the whole input
    flat = preprocess_frames(np.full((10, 40, 3), 200, np.uint8), 32, 40, "cpu")  # a flat image stays flat
    np.testing.assert_allclose(flat.numpy(), 200 / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("shape, match", [
    ((1, 3000, 3), "aspect ratio"),  # the 1 x 300000 attack, smaller: refused before any allocation
    ((2049, 2049, 3), "pixels"),
    ((65, 4, 4, 3), "frames"),
    ((0, 0, 3), "empty"),
    ((0, 4, 4, 3), "empty"),
])
def test_images_beyond_the_bounds_or_empty_are_refused(policy, shape, match):
    with pytest.raises(ValueError, match=match):
        policy.predict_action_chunk({"image": np.zeros(shape, np.uint8), "instruction": INSTR})


def test_text_cache_is_lru_bounded():
    small = _make_policy(sampling_steps=1, text_cache_size=3)
    for i in range(6):
        small.predict_action_chunk({"image": _image((32, 40, 3)), "instruction": f"task {i}", "seed": 0})
    assert list(small._text_cache) == ["task 3", "task 4", "task 5"]
    small.predict_action_chunk({"image": _image((32, 40, 3)), "instruction": "task 3", "seed": 0})  # a hit
    small.predict_action_chunk({"image": _image((32, 40, 3)), "instruction": "task 6", "seed": 0})
    assert list(small._text_cache) == ["task 5", "task 3", "task 6"]


def test_long_instruction_refused(policy):
    with pytest.raises(ValueError, match="characters"):
        policy.predict_action_chunk({"image": _image((32, 40, 3)), "instruction": "x" * 100_000})


@pytest.fixture()
def line_server():
    line = LinePolicy()
    with PolicyServer(line, "127.0.0.1", 0, limits=Limits(max_pixels=32 * 40)) as server:
        yield server


def test_server_refuses_over_limit_before_inference(line_server):
    with PolicyClient("127.0.0.1", line_server.port) as client:
        calls = line_server.policy.calls
        with pytest.raises(PolicyServerError, match="pixels"):
            client.infer({"image": np.zeros((64, 80, 3), np.uint8), "instruction": "go"})
        assert line_server.policy.calls == calls  # the policy never ran
        assert client.metadata["limits"]["max_pixels"] == 32 * 40


@pytest.mark.parametrize("request_", [
    {"type": "infer", "observation": {"image": np.zeros((32, 40, 3), np.uint8), "instruction": "go",
                                      "seed": "y" * 1_000_000}},
    {"type": "z" * 1_000_000},
    {"type": "infer", "observation": {"image": np.zeros((32, 40, 3), np.uint8), "instruction": "i" * 1_000_000}},
])
def test_errors_never_echo_the_request(line_server, caplog, request_):
    with caplog.at_level(logging.INFO, logger="policies.serve"), PolicyClient("127.0.0.1", line_server.port) as c:
        with pytest.raises(PolicyServerError) as err:
            c._request(request_)
    assert len(str(err.value)) < 1000
    assert caplog.records and all(len(r.getMessage()) < 25_000 for r in caplog.records)


def test_tracebacks_reach_clients_only_in_debug():
    for debug in (False, True):
        with PolicyServer(LinePolicy(), "127.0.0.1", 0, debug=debug) as server:
            with PolicyClient("127.0.0.1", server.port) as client:
                with pytest.raises(PolicyServerError, match="boom") as err:
                    client.infer({"image": np.zeros((32, 40, 3), np.uint8), "instruction": "explode"})
        assert ("Traceback" in err.value.remote_traceback) is debug


# ------------------------------------------------------------------ item 2: no silent wrong actions in-process
@pytest.mark.parametrize("instruction, match", [("", "empty or blank"), ("   ", "empty or blank"),
                                                (None, "missing"), (5, "must be a str")])
def test_every_entry_point_refuses_bad_instructions(policy, instruction, match):
    image = _image((32, 40, 3))
    with pytest.raises(ValueError, match=match):
        policy.select_action({"image": image[None].repeat(2, 0), "instruction": [instruction] * 2})
    with pytest.raises(ValueError, match=match):
        policy.predict_action_chunk({"image": image, "instruction": instruction})
    with pytest.raises(ValueError, match=match):
        policy.predict_action_chunk({"observation.images.top": torch.rand(1, 3, 32, 40), "task": [instruction]})
    policy.reset()
    with pytest.raises(ValueError, match="instruction"):
        policy.step(image, instruction)


@pytest.mark.parametrize("seed", [1.5, 2.0, True, "3", [1]])
def test_non_integer_seeds_refused(policy, seed):
    with pytest.raises(ValueError, match="seed"):
        policy.predict_action_chunk({"image": _image((32, 40, 3)), "instruction": INSTR, "seed": seed})


def test_numpy_integer_seed_accepted(policy):
    a = policy.predict_action_chunk({"image": _image((32, 40, 3)), "instruction": INSTR, "seed": np.int64(3)})
    b = policy.predict_action_chunk({"image": _image((32, 40, 3)), "instruction": INSTR, "seed": 3})
    np.testing.assert_array_equal(a["actions"], b["actions"])


def test_nan_weights_never_give_actions(ckpt):
    broken = _make_policy(sampling_steps=1, seed=0)
    with torch.no_grad():
        broken.model.inputs["video"].weight[0, 0] = float("nan")  # one corrupt weight
    image = _image((32, 40, 3))
    with pytest.raises(ValueError, match="non-finite"):
        broken.predict_action_chunk({"image": image, "instruction": INSTR})
    with pytest.raises(ValueError, match="non-finite"):
        broken.select_action({"image": image[None], "instruction": [INSTR]})
    with pytest.raises(ValueError, match="non-finite"):
        broken.predict_action_chunk({"observation.images.top": torch.rand(1, 3, 32, 40), "task": [INSTR]})
    broken.reset(INSTR)
    with pytest.raises(ValueError, match="non-finite"):
        broken.step(image)
    saved = broken.save_pretrained(ckpt.parent / "nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        SelfFlowPolicy.from_pretrained(saved, device="cpu")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["run"]["data"].update(height=33), "height x width"),  # not a multiple of the codec's patch
    (lambda c: c["run"]["codec"].update(patch=4), "codec"),  # frame tokens narrower than the weights take
    (lambda c: c["run"]["data"].update(horizon=0), "horizon"),
    (lambda c: c["run"]["data"].update(width="40"), "width"),
])
def test_config_geometry_checked_against_weights(ckpt, tmp_path, edit, match):
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in ckpt.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    config = json.loads((edited / "config.json").read_text())
    edit(config)
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        SelfFlowPolicy.from_pretrained(edited, device="cpu")
    assert SelfFlowPolicy.from_pretrained(ckpt, device="cpu").metadata["horizon"] == 4  # the intact one loads
