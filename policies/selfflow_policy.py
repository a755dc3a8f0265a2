"""`SelfFlowPolicy`: a fine-tuned world-model checkpoint driving a robot, in three lines.

    policy = SelfFlowPolicy.from_pretrained("outputs/finetune_rt1/<time>/checkpoint")
    policy.reset("move the gripper to the red block")
    raw_action, action = policy.step(image)          # SIMPLER Google-robot convention

The model samples only the action tokens (about 10 Euler steps) given clean context frames and the
instruction; `imagine()` runs the video branch for a user who wants to see what the model expects.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from policies.lerobot import EXPECTED as LEROBOT_KEYS
from policies.lerobot import is_lerobot_batch, rows_from_lerobot
from policies.stepper import ChunkedPolicy, context_indices
from policies.validation import DEFAULT_LIMITS, Limits, check_image, validate_observation
from worldmodel.builders import FINETUNE_KIND as KIND


def preprocess_frames(frames: np.ndarray, height: int, width: int, device, limits: Limits = DEFAULT_LIMITS
                      ) -> torch.Tensor:
    """(T, H, W, 3) or (H, W, 3) uint8 RGB -> (1, T, 3, height, width) float in [-1, 1], validated and resized.

    As the RT-1 reader: resize to cover, then centre-crop. A frame smaller than the target on some side is
    centre-cropped to the target's aspect ratio first and then upscaled, so the work never exceeds
    (input + output) pixels, whatever the input's shape; `limits` bounds the input (validation.check_image)."""
    frames = check_image(frames, limits)  # (T, H, W, 3)
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if x.shape[-2:] != (height, width):
        scale = max(height / x.shape[-2], width / x.shape[-1])
        if scale > 1:  # upscale: crop to the target's aspect in input pixels first, then resize exactly
            keep_h, keep_w = min(x.shape[-2], math.ceil(height / scale)), min(x.shape[-1], math.ceil(width / scale))
            top, left = (x.shape[-2] - keep_h) // 2, (x.shape[-1] - keep_w) // 2
            x = x[..., top: top + keep_h, left: left + keep_w]
            x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                                align_corners=False)
        else:  # downscale (never larger than the input), then centre-crop
            size = (max(height, math.ceil(x.shape[-2] * scale)), max(width, math.ceil(x.shape[-1] * scale)))
            x = torch.nn.functional.interpolate(x, size=size, mode="area")
            top, left = (size[0] - height) // 2, (size[1] - width) // 2
            x = x[..., top: top + height, left: left + width]
        x = x.clamp(0, 255).round()  # uint8, as stored
    return (x / 127.5 - 1.0).clamp(-1, 1)[None]  # (1, T, 3, h, w)


def float32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with its half-precision (bf16 / fp16) floating tensors upcast to float32, and a
    warning when there were any (a compiled policy's in-place bf16 backbone: the values carry bf16 rounding)."""
    state = module.state_dict()
    low = [k for k, v in state.items() if v.dtype in (torch.bfloat16, torch.float16)]
    if low:
        warnings.warn(f"saving {len(low)} half-precision tensors of {type(module).__name__} (e.g. {low[0]}, "
                      f"{state[low[0]].dtype}) upcast to float32: they carry its rounding; save from a policy "
                      "loaded with compile=False to keep the original float32 weights", stacklevel=3)
    return {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in state.items()}


class SelfFlowPolicy(ChunkedPolicy):
    """Policy over a fine-tuned checkpoint: `step`, `predict_action_chunk`, `select_action`, `imagine`.

    execute_steps: actions executed per chunk (default: the whole chunk); ensemble: temporal ensembling.
    sampling_steps: Euler steps per chunk; seed: fixed seed per chunk for reproducible actions (None uses
    torch's global RNG, so `torch.manual_seed` makes runs reproducible). limits: bounds on one observation
    (policies.validation.Limits); text_cache_size: instructions whose text features are kept (LRU);
    camera: which `observation.images.<camera>` of a LeRobot batch the model sees (needed with several).
    """

    batched_inference = True  # predict_action_chunk(list) runs one batched call (the server relies on it)

    def __init__(self, model, text_encoder, codec, normalizer, run_cfg: dict, device="cpu", sampling_steps: int = 10,
                 execute_steps: int | None = None, ensemble: bool = False, seed: int | None = None,
                 sticky_gripper: int = 1, state_normalizer=None, limits: Limits = DEFAULT_LIMITS,
                 text_cache_size: int = 64, camera: str | None = None,
                 compile: bool = False):
        from worldmodel.action_modes import WindowLayout

        data = run_cfg["data"]
        super().__init__(execute_steps, ensemble, sticky_gripper=sticky_gripper,
                         context_frames=int(data["context_frames"]), frame_stride=int(data["frame_stride"]))
        self.model, self.text_encoder, self.codec, self.normalizer = model, text_encoder, codec, normalizer
        self.run_cfg, self.device = run_cfg, torch.device(device)
        self.geometry = WindowLayout(int(data["context_frames"]), int(data["future_frames"]), int(data["frame_stride"]),
                                     int(data["horizon"]))
        self.height, self.width = int(data["height"]), int(data["width"])
        self.sampling_steps, self.seed = int(sampling_steps), seed
        self.uses_state = bool(data.get("state", False))
        if self.uses_state and state_normalizer is None:
            raise ValueError("this checkpoint conditions on proprioception (data.state=true) but has no state stats")
        self.state_normalizer = state_normalizer
        # Each modality is integrated on the clock it was trained on (objective.modality_shift, e.g. actions 7.4).
        self.modality_shift = dict((run_cfg.get("objective") or {}).get("modality_shift") or {})
        self.limits, self.camera = limits, camera
        if text_cache_size < 1:
            raise ValueError(f"text_cache_size must be >= 1, got {text_cache_size}")
        self.text_cache_size = int(text_cache_size)
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # LRU, newest last
        from worldmodel.fast_sampling import ChunkSampler  # compile=True on CUDA: bf16 + compiled + one CUDA graph

        self._chunk_sampler = ChunkSampler(model, self.sampling_steps, self.modality_shift, compile=compile)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, **options) -> SelfFlowPolicy:
        """Load `config.json`, `model.safetensors` and `action_stats.json` from a fine-tuning checkpoint dir.

        options: keyword arguments of the constructor (sampling_steps, execute_steps, seed, limits, ...).
        The config's geometry is checked against the weights, and the weights must be finite."""
        from policies.checkpoint_checks import check_finite_weights, check_geometry
        from worldmodel.actions import ActionNormalizer
        from worldmodel.builders import build_frames_codec, build_text
        from worldmodel.checkpoint import load_checkpoint
        from worldmodel.sizes import build_model_from_config

        path = Path(path)
        ckpt = load_checkpoint(path, expected_kind=KIND)
        if "action_stats" not in ckpt.extra_json:
            raise ValueError(f"{path} has no action_stats.json: it is not a complete fine-tuning checkpoint")
        run = ckpt.config["run"]
        model = build_model_from_config(ckpt.config["model"])
        text = build_text(OmegaConf.create(run["text"]))
        ckpt.load_into({"model": model, "text_encoder": text})
        check_finite_weights(path, {"model": model, "text_encoder": text})
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        normalizer = ActionNormalizer.from_dict(ckpt.extra_json["action_stats"])
        state_normalizer = None
        if run["data"].get("state", False):
            from worldmodel.state import StateNormalizer

            if "state_stats" not in ckpt.extra_json:
                raise ValueError(f"{path} conditions on proprioception but has no state_stats.json: "
                                 "an incomplete checkpoint")
            state_normalizer = StateNormalizer.from_dict(ckpt.extra_json["state_stats"])
        codec = build_frames_codec(OmegaConf.create(run["codec"]))
        check_geometry(path, run, model, codec, text)
        if not options.get("ensemble", False):  # the recipe's execution horizon, unless the caller chooses
            options.setdefault("execute_steps", (run.get("policy") or {}).get("execute_steps"))
        return cls(model.to(device).eval(), text.to(device).eval(), codec, normalizer, run, device,
                   state_normalizer=state_normalizer, **options)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a checkpoint directory that `from_pretrained` reads back (atomically), weights in float32.

        A policy built with ``compile=True`` on CUDA runs a bf16 copy of the backbone (cast in place); its
        weights are written upcast to float32 (with a warning: they carry bf16 rounding; save from a policy
        loaded with ``compile=False`` to keep the checkpoint's exact values)."""
        from worldmodel.checkpoint import save_checkpoint

        config = {"kind": KIND, "model": self.model.config, "run": self.run_cfg}
        extra = {"action_stats": self.normalizer.to_dict()}
        if self.state_normalizer is not None:
            extra["state_stats"] = self.state_normalizer.to_dict()
        states = {"model": float32_state(self.model), "text_encoder": float32_state(self.text_encoder)}
        return save_checkpoint(path, states, config, extra_json=extra)

    @property
    def metadata(self) -> dict:
        """What the policy server sends on connect."""
        return {"model_kind": KIND, "horizon": self.geometry.horizon, "action_dim": 7,
                "image_size": [self.height, self.width], "context_frames": self.geometry.context_frames,
                "frame_stride": self.geometry.frame_stride, "sampling_steps": self.sampling_steps,
                "uses_state": self.uses_state,
                "model_size": self.model.config.get("size")}

    # ---------------------------------------------------------------------------------- inference
    def _text(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L, D) text features and (1, L) mask of one instruction, kept for the `text_cache_size` latest."""
        if instruction in self._text_cache:
            self._text_cache.move_to_end(instruction)
        else:
            with torch.no_grad():
                self._text_cache[instruction] = self.text_encoder.encode([instruction], device=self.device)
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return self._text_cache[instruction]

    def _texts(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B instructions -> (B, L, D) features and (B, L) mask, padded (masked) to the longest."""
        feats = [self._text(i) for i in instructions]
        length = max(f.shape[1] for f, _ in feats)
        text = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, length - f.shape[1])) for f, _ in feats])
        mask = torch.cat([torch.nn.functional.pad(m.bool(), (0, length - m.shape[1])) for _, m in feats])
        return text, mask

    def _context_picks(self, num_frames: int) -> list[int]:
        """Which of ``num_frames`` recent frames (oldest first, one per control step) form the trained context:
        offsets -(Tc-1)*stride .. 0, the first frame repeated before an episode has enough (as the reader)."""
        return context_indices(num_frames, self.geometry.context_frames, self.geometry.frame_stride)

    def _inputs(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A validated observation (recent frames (T, H, W, 3) | (H, W, 3) uint8, states (T, 8) | (8,) | None) ->
        the context the model trained on: (1, Tc, 3, h, w) frames and (1, Tc, 8) normalized states (None
        without a state modality)."""
        frames = check_image(obs["image"], self.limits)  # (T, H, W, 3)
        picks = self._context_picks(len(frames))  # only the Tc context frames are resized (bounded work)
        x = preprocess_frames(frames[picks], self.height, self.width, self.device, self.limits)  # (1, Tc, 3, h, w)
        return x, self._states(obs.get("state"), len(frames))

    def _states(self, states: np.ndarray | None, num_frames: int) -> torch.Tensor | None:
        """(T, 8) | (8,) validated raw states given with ``num_frames`` frames -> (1, Tc, 8) normalized, or None."""
        if not self.uses_state:
            return None  # a checkpoint trained without proprioception ignores it
        if states is None:
            raise ValueError("this policy conditions on proprioception: pass state=(8,) (tool x y z, quaternion "
                             "w x y z in the robot base frame, gripper closedness 0..1) with every image")
        arr = np.asarray(states, np.float32).reshape(-1, 8)[self._context_picks(num_frames)]  # (Tc, 8)
        return torch.as_tensor(self.state_normalizer.normalize(arr), device=self.device)[None]

    @torch.no_grad()
    def _sample_chunks(self, context: torch.Tensor, instructions: list[str], seeds: list[int | None],
                       state: torch.Tensor | None = None) -> np.ndarray:
        """(B, Tc, 3, h, w) contexts [+ (B, Tc, 8) states], B instructions and seeds -> (B, H, 8): 7 RT-1 action
        columns (physical units) + terminate, in ONE sampling call. Row i's noise is drawn as a single call
        with seeds[i] would draw it (its own generator, or the global RNG in row order when None), so the rows
        equal B single calls. Raises ValueError rather than return a non-finite action."""
        from worldmodel.action_modes import build_sequence, split_action_tokens

        b, h = context.shape[0], self.geometry.horizon
        text, text_mask = self._texts(instructions)
        zeros = torch.zeros(b, h, 7, device=self.device)
        seq = build_sequence("policy", self.codec, context, None, zeros, torch.zeros(b, h, device=self.device),
                             torch.ones(b, h, dtype=torch.bool, device=self.device), self.geometry, text, text_mask,
                             state=state)
        row_shape, dtype = (1, *seq.x.shape[1:]), seq.x.dtype
        noise = torch.cat([torch.randn(row_shape, device=self.device, dtype=dtype, generator=None if s is None else
                                       torch.Generator(device=self.device).manual_seed(s)) for s in seeds])
        out = self._chunk_sampler(seq, noise=noise)
        actions, terminate = split_action_tokens(out.x[:, -h:, : self.model.token_dim["action"]])
        raw = self.normalizer.unnormalize(actions.float().cpu().numpy().reshape(b * h, 7)).reshape(b, h, 7)
        chunks = np.concatenate([raw, terminate.float().cpu().numpy()[..., None]], axis=2)  # (B, H, 8)
        bad = [i for i in range(b) if not np.all(np.isfinite(chunks[i]))]
        if bad:
            raise ValueError(f"the model produced non-finite actions for rows {bad} of {b}: its weights or inputs "
                             "are corrupt (NaN / inf); no action is returned")
        return chunks

    def _sample_chunk(self, context: torch.Tensor, instruction: str, seed: int | None,
                      state: torch.Tensor | None = None) -> np.ndarray:
        """(1, Tc, 3, h, w) context [+ (1, Tc, 8) state] -> (H, 8) (one row of `_sample_chunks`)."""
        return self._sample_chunks(context, [instruction], [seed], state)[0]

    def reseed(self, seed: int) -> None:
        """Seed this episode's sampling noise (chunk n uses seed * 100_003 + n); the evaluator calls it per episode."""
        self._episode_seed, self._chunks = int(seed), 0

    def _next_seed(self) -> int | None:
        """The seed of the next chunk step() / select_action() asks for: fixed, per episode, or None (global RNG)."""
        if self.seed is None and getattr(self, "_episode_seed", None) is not None:
            self._chunks += 1
            return self._episode_seed * 100_003 + self._chunks - 1
        return self.seed

    def _query(self, frames: np.ndarray, instruction: str, states: np.ndarray | None = None) -> np.ndarray:
        obs = validate_observation({"image": frames, "instruction": instruction, "state": states}, self.limits)
        context, state = self._inputs(obs)
        return self._sample_chunk(context, obs["instruction"], self._next_seed(), state)

    def _chunks_for(self, observations: list[dict]) -> np.ndarray:
        """B raw observations -> (B, H, 8) chunks: each validated, then one batched sampling call."""
        if not observations:
            raise ValueError("no observations: pass at least one")
        checked = [validate_observation(o, self.limits) for o in observations]
        seeds = [o["seed"] if "seed" in raw else self.seed for o, raw in zip(checked, observations)]
        inputs = [self._inputs(o) for o in checked]
        context = torch.cat([c for c, _ in inputs])  # (B, Tc, 3, h, w)
        state = None if inputs[0][1] is None else torch.cat([s for _, s in inputs])  # (B, Tc, 8)
        return self._sample_chunks(context, [o["instruction"] for o in checked], seeds, state)

    def predict_action_chunk(self, observation):
        """One observation, a list of them, or a LeRobot batch -> action chunks, stateless (the server shares one
        instance); actions in RT-1 units.

        - {"image": (H, W, 3) | (T, H, W, 3) uint8, "instruction", "state"?, "seed"?} (or openpi's keys
          "observation/image", "observation/state", "prompt") -> {"actions" (H, 7), "terminate" (H,)} float32.
          image: the recent frames at the control rate, oldest first (the last (context_frames - 1) *
          frame_stride + 1 suffice; metadata says both), from which the trained context is picked exactly as
          step() picks it; fewer at an episode's start (the first is repeated). state: (8,) or (T, 8)
          proprioception read with the frames (checkpoints with a state modality need it).
        - a list of B such observations -> a list of B such dicts, from one batched sampling call.
        - LeRobot: {"observation.images.<camera>": (B, 3, H, W) float [0, 1], "observation.state"?: (B, S),
          "task": list[str]} -> torch tensor (B, H, 7) on the policy's device.
        """
        if is_lerobot_batch(observation):
            chunks = self._chunks_for(rows_from_lerobot(observation, self.camera))
            return torch.as_tensor(chunks[..., :7], dtype=torch.float32, device=self.device)  # (B, H, 7)
        if isinstance(observation, (list, tuple)):
            chunks = self._chunks_for(list(observation))
            return [{"actions": c[:, :7].astype(np.float32), "terminate": c[:, 7].astype(np.float32)} for c in chunks]
        if not isinstance(observation, dict):
            raise ValueError(f"predict_action_chunk takes an observation dict {{'image', 'instruction'}}, a list of "
                             f"them, or a LeRobot batch ({LEROBOT_KEYS}); got {type(observation).__name__}")
        chunk = self._chunks_for([observation])[0]
        return {"actions": chunk[:, :7].astype(np.float32), "terminate": chunk[:, 7].astype(np.float32)}

    def select_action(self, batch: dict):
        """One call per control step for B environments; each row keeps its own frame history and action queue
        (reset() starts new episodes); rows whose queue is empty get new chunks from one batched call.

        - toolkit: {"image": (B, H, W, 3) uint8, "instruction": list[str] | str, "state"?: (B, 8)} -> (B, 7) numpy.
        - LeRobot: {"observation.images.<camera>": (B, 3, H, W) float [0, 1], "observation.state"?: (B, S),
          "task": list[str]} -> torch tensor (B, 7) on the policy's device.
        """
        lerobot = is_lerobot_batch(batch)
        if lerobot:
            rows = rows_from_lerobot(batch, self.camera)
            if any(len(r["image"]) != 1 for r in rows):
                raise ValueError("select_action takes one frame per row, (B, 3, H, W); the policy keeps the history")
            rows = [{**r, "image": r["image"][0]} for r in rows]
        elif isinstance(batch, dict) and "image" in batch and "instruction" in batch:
            images, instructions = batch["image"], batch["instruction"]
            if isinstance(instructions, str):
                instructions = [instructions] * len(images)
            if not isinstance(instructions, (list, tuple)) or len(instructions) != len(images):
                raise ValueError(f"select_action got {len(images)} images but instructions "
                                 f"{type(instructions).__name__}; pass one instruction per image (or one str)")
            states = batch.get("state")
            if states is not None and len(states) != len(images):
                raise ValueError(f"select_action got {len(images)} images but {len(states)} states")
            rows = [{"image": images[i], "instruction": instructions[i],
                     "state": None if states is None else states[i]} for i in range(len(images))]
        else:
            raise ValueError("select_action takes {'image': (B, H, W, 3) uint8, 'instruction': list[str]} or a "
                             f"LeRobot batch ({LEROBOT_KEYS}); got keys "
                             f"{sorted(map(str, batch))[:8] if isinstance(batch, dict) else type(batch).__name__}")
        actions = self._step_rows(rows)  # (B, 7)
        return torch.as_tensor(actions, dtype=torch.float32, device=self.device) if lerobot else actions

    def _step_rows(self, rows: list[dict]) -> np.ndarray:
        """B single-frame observations -> (B, 7): per-row history + queue, empty queues refilled in one call."""
        if not getattr(self, "_rows", None) or len(self._rows) != len(rows):
            self._rows = [ChunkedPolicy(self.queue.execute_steps, context_frames=self.context_frames,
                                        frame_stride=self.frame_stride) for _ in rows]
        checked = [validate_observation(obs, self.limits) for obs in rows]  # before any row's history changes
        frames = [row._checked(obs["image"]) for row, obs in zip(self._rows, checked)]
        for row, obs, frame in zip(self._rows, checked, frames):
            row.history.append(frame)
            row.state_history.append(obs["state"])
        empty = [i for i, row in enumerate(self._rows) if row.queue.empty]
        if empty:
            chunks = self._chunks_for([{"image": self._rows[i].recent_frames(), "instruction": rows[i]["instruction"],
                                        "state": self._rows[i].recent_states(), "seed": self._next_seed()}
                                       for i in empty])
            for i, chunk in zip(empty, chunks):
                self._rows[i].queue.push(chunk)
        return np.stack([row.queue.pop()[:7] for row in self._rows])

    def reset(self, instruction: str | None = None) -> None:
        super().reset(instruction)
        self._rows = []
        self._episode_seed = None

    @torch.no_grad()
    def imagine(self, image: np.ndarray, instruction: str, actions: np.ndarray | None = None, steps: int = 20,
                seed: int | None = 0, state: np.ndarray | None = None) -> np.ndarray:
        """Predicted future frames (Tf, h, w, 3) uint8: given actions (H, 7) in RT-1 units (forward dynamics),
        or jointly with the model's own actions when None. image: as in predict_action_chunk."""
        from worldmodel.action_modes import build_sequence
        from worldmodel.sampling import sample

        h, tf = self.geometry.horizon, self.geometry.future_frames
        if tf == 0:
            raise ValueError("this checkpoint was trained without future frames (data.future_frames=0)")
        obs = validate_observation({"image": image, "instruction": instruction, "state": state, "seed": seed},
                                   self.limits)
        context, states = self._inputs(obs)
        future = torch.zeros(1, tf, 3, self.height, self.width, device=self.device)
        mode = "joint" if actions is None else "dynamics"
        acts = np.zeros((h, 7), np.float32) if actions is None else self.normalizer.normalize(np.asarray(actions))
        if acts.shape != (h, 7):
            raise ValueError(f"actions must be ({h}, 7) in RT-1 units, got {acts.shape}")
        text, text_mask = self._text(instruction)
        seq = build_sequence(mode, self.codec, context, future, torch.as_tensor(acts, device=self.device)[None].float(),
                             torch.zeros(1, h, device=self.device), torch.ones(1, h, dtype=torch.bool,
                                                                                 device=self.device),
                             self.geometry, text, text_mask, state=states)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))
        out = sample(self.model, seq, steps=steps, generator=generator, modality_shift=self.modality_shift)
        n_ctx = self.codec.num_tokens(context.shape)
        n_fut = self.codec.num_tokens(future.shape)
        frames = self.codec.decode(out.x[:, n_ctx: n_ctx + n_fut, : self.model.token_dim["video"]], future.shape)
        return ((frames[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    def __repr__(self) -> str:
        return f"SelfFlowPolicy({json.dumps(self.metadata)})"
