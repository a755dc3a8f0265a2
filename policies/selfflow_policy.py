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
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from policies.stepper import ChunkedPolicy, check_state, context_indices
from worldmodel.builders import FINETUNE_KIND as KIND


def preprocess_frames(frames: np.ndarray, height: int, width: int, device) -> torch.Tensor:
    """(T, H, W, 3) or (H, W, 3) uint8 RGB -> (1, T, 3, height, width) float in [-1, 1], validated and resized."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"image must be a numpy array (H, W, 3) uint8, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        has_nan = frames.dtype.kind == "f" and bool(np.isnan(frames).any())
        hint = " and it holds NaNs" if has_nan else ""
        raise ValueError(f"image must be uint8 RGB in [0, 255], got dtype {frames.dtype}{hint}; "
                         "convert with (img * 255).astype(np.uint8) if it is float in [0, 1]")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB (or (T, H, W, 3) frames), got shape {frames.shape}; "
                         "drop an alpha channel with img[..., :3] or stack a grey image to 3 channels")
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if x.shape[-2:] != (height, width):  # as the RT-1 reader: resize to cover, then centre-crop
        scale = max(height / x.shape[-2], width / x.shape[-1])
        size = (max(height, math.ceil(x.shape[-2] * scale)), max(width, math.ceil(x.shape[-1] * scale)))
        if scale < 1:
            x = torch.nn.functional.interpolate(x, size=size, mode="area")
        else:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[..., top: top + height, left: left + width].clamp(0, 255).round()  # uint8, as stored
    return (x / 127.5 - 1.0).clamp(-1, 1)[None]  # (1, T, 3, h, w)


class SelfFlowPolicy(ChunkedPolicy):
    """Policy over a fine-tuned checkpoint: `step`, `predict_action_chunk`, `select_action`, `imagine`.

    execute_steps: actions executed per chunk (default: the whole chunk); ensemble: temporal ensembling.
    sampling_steps: Euler steps per chunk; seed: fixed seed per chunk for reproducible actions (None uses
    torch's global RNG, so `torch.manual_seed` makes runs reproducible).
    """

    def __init__(self, model, text_encoder, codec, normalizer, run_cfg: dict, device="cpu", sampling_steps: int = 10,
                 execute_steps: int | None = None, ensemble: bool = False, seed: int | None = None,
                 sticky_gripper: int = 1, state_normalizer=None):
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
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, **options) -> SelfFlowPolicy:
        """Load `config.json`, `model.safetensors` and `action_stats.json` from a fine-tuning checkpoint dir."""
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
        if not options.get("ensemble", False):  # the recipe's execution horizon, unless the caller chooses
            options.setdefault("execute_steps", (run.get("policy") or {}).get("execute_steps"))
        return cls(model.to(device).eval(), text.to(device).eval(), codec, normalizer, run, device,
                   state_normalizer=state_normalizer, **options)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a checkpoint directory that `from_pretrained` reads back (atomically)."""
        from worldmodel.checkpoint import save_checkpoint

        config = {"kind": KIND, "model": self.model.config, "run": self.run_cfg}
        extra = {"action_stats": self.normalizer.to_dict()}
        if self.state_normalizer is not None:
            extra["state_stats"] = self.state_normalizer.to_dict()
        return save_checkpoint(path, {"model": self.model, "text_encoder": self.text_encoder}, config,
                               extra_json=extra)

    @property
    def metadata(self) -> dict:
        """What the policy server sends on connect."""
        return {"model_kind": KIND, "horizon": self.geometry.horizon, "action_dim": 7,
                "image_size": [self.height, self.width], "context_frames": self.geometry.context_frames,
                "frame_stride": self.geometry.frame_stride, "sampling_steps": self.sampling_steps,
                "uses_state": self.uses_state,
                "model_size": self.model.config.get("size")}

    # ---------------------------------------------------------------------------------- inference
    def _text(self, instruction: str):
        if instruction not in self._text_cache:
            with torch.no_grad():
                self._text_cache[instruction] = self.text_encoder.encode([instruction], device=self.device)
        return self._text_cache[instruction]

    def _context_picks(self, num_frames: int) -> list[int]:
        """Which of ``num_frames`` recent frames (oldest first, one per control step) form the trained context:
        offsets -(Tc-1)*stride .. 0, the first frame repeated before an episode has enough (as the reader)."""
        return context_indices(num_frames, self.geometry.context_frames, self.geometry.frame_stride)

    def _inputs(self, frames, states) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Recent frames (T, H, W, 3) | (H, W, 3) uint8 and their states (T, 8) | (8,) | None -> the context the
        model trained on: (1, Tc, 3, h, w) frames and (1, Tc, 8) normalized states (None without a state modality)."""
        x = preprocess_frames(np.asarray(frames), self.height, self.width, self.device)  # (1, T, 3, h, w)
        return x[:, self._context_picks(x.shape[1])], self._states(states, x.shape[1])

    def _states(self, states, num_frames: int) -> torch.Tensor | None:
        """(T, 8) | (8,) raw states given with ``num_frames`` frames -> (1, Tc, 8) normalized, or None."""
        if not self.uses_state:
            return None  # a checkpoint trained without proprioception ignores it
        if states is None:
            raise ValueError("this policy conditions on proprioception: pass state=(8,) (tool x y z, quaternion "
                             "w x y z in the robot base frame, gripper closedness 0..1) with every image")
        arr = np.asarray(states, dtype=np.float32)
        if arr.ndim == 1:
            if num_frames != 1:
                raise ValueError(f"got one state for {num_frames} frames; pass one state per frame ({num_frames}, 8)")
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[0] != num_frames:
            raise ValueError(f"state must be (8,) or ({num_frames}, 8) to match the frames, got {arr.shape}")
        arr = np.stack([check_state(s) for s in arr])[self._context_picks(num_frames)]  # (Tc, 8)
        return torch.as_tensor(self.state_normalizer.normalize(arr), device=self.device)[None]

    @torch.no_grad()
    def _sample_chunk(self, context: torch.Tensor, instruction: str, seed: int | None,
                      state: torch.Tensor | None = None) -> np.ndarray:
        """(1, Tc, 3, h, w) context [+ (1, Tc, 8) state] -> (H, 8): 7 RT-1 action columns (physical units) +
        terminate."""
        from worldmodel.action_modes import build_sequence, split_action_tokens
        from worldmodel.sampling import sample

        h = self.geometry.horizon
        text, text_mask = self._text(instruction)
        zeros = torch.zeros(1, h, 7, device=self.device)
        seq = build_sequence("policy", self.codec, context, None, zeros, torch.zeros(1, h, device=self.device),
                             torch.ones(1, h, dtype=torch.bool, device=self.device), self.geometry, text, text_mask,
                             state=state)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))
        out = sample(self.model, seq, steps=self.sampling_steps, generator=generator,
                     modality_shift=self.modality_shift)
        actions, terminate = split_action_tokens(out.x[:, -h:, : self.model.token_dim["action"]])
        raw = self.normalizer.unnormalize(actions[0].float().cpu().numpy())  # (H, 7)
        return np.concatenate([raw, terminate[0].float().cpu().numpy()[:, None]], axis=1)

    def reseed(self, seed: int) -> None:
        """Seed this episode's sampling noise (chunk n uses seed * 100_003 + n); the evaluator calls it per episode."""
        self._episode_seed, self._chunks = int(seed), 0

    def _query(self, frames: np.ndarray, instruction: str, states: np.ndarray | None = None) -> np.ndarray:
        seed = self.seed
        if seed is None and getattr(self, "_episode_seed", None) is not None:
            seed = self._episode_seed * 100_003 + self._chunks
            self._chunks += 1
        context, state = self._inputs(frames, states)
        return self._sample_chunk(context, instruction, seed, state)

    def predict_action_chunk(self, observation: dict) -> dict:
        """{"image": (H, W, 3) | (T, H, W, 3) uint8, "instruction", "state"?, "seed"?} -> {"actions" (H, 7),
        "terminate" (H,)}.

        image: the recent frames at the control rate, oldest first (the last (context_frames - 1) *
        frame_stride + 1 suffice; metadata says both), from which the trained context is picked exactly as
        step() picks it; fewer at an episode's start (the first is repeated). state: (8,) or (T, 8)
        proprioception read with the frames (checkpoints with a state modality need it). Stateless (the
        server shares one instance); actions in RT-1 units.
        """
        if not isinstance(observation, dict) or "image" not in observation:
            raise ValueError("observation must be a dict with 'image' (H, W, 3) uint8 and 'instruction' str")
        instruction = observation.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("observation['instruction'] is missing or empty; pass the task's language instruction")
        seed = observation.get("seed", self.seed)
        context, state = self._inputs(observation["image"], observation.get("state"))
        chunk = self._sample_chunk(context, instruction, seed, state)
        return {"actions": chunk[:, :7].astype(np.float32), "terminate": chunk[:, 7].astype(np.float32)}

    def select_action(self, batch: dict) -> np.ndarray:
        """LeRobot-style: {"image": (B, H, W, 3) uint8, "instruction": list[str], "state"?: (B, 8)} -> (B, 7),
        one call per control step. Each row keeps its own frame history (the context the model trained on,
        as step() builds it) and action queue; reset() starts new episodes."""
        images, instructions = batch["image"], batch["instruction"]
        if isinstance(instructions, str):
            instructions = [instructions] * len(images)
        if len(instructions) != len(images):
            raise ValueError(f"select_action got {len(images)} images but {len(instructions)} instructions")
        states = batch.get("state")
        if states is not None and len(states) != len(images):
            raise ValueError(f"select_action got {len(images)} images but {len(states)} states")
        if not getattr(self, "_rows", None) or len(self._rows) != len(images):
            self._rows = [ChunkedPolicy(self.queue.execute_steps, context_frames=self.context_frames,
                                        frame_stride=self.frame_stride) for _ in images]
        out = []
        for i, (row, image, instruction) in enumerate(zip(self._rows, images, instructions)):
            row.history.append(row._checked(np.asarray(image)))
            row.state_history.append(check_state(None if states is None else states[i]))
            if row.queue.empty:
                row.queue.push(self._query(row.recent_frames(), instruction, row.recent_states()))
            out.append(row.queue.pop()[:7])
        return np.stack(out)

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
        context, states = self._inputs(image, state)
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
