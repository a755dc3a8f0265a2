"""Checkpoints: a directory of safetensors + JSON, written atomically, loaded strictly. Never pickle.

Layout of a checkpoint directory::

    config.json            {"kind": "worldmodel.pretrain", "model": {...}, ...free metadata}
    model.safetensors      inference weights (EMA weights where EMA is on), keys "<module>.<param>"
    <name>.json            extra JSON attached by the caller (e.g. action_stats.json)
    train_state/           only for resuming:
        modules.safetensors    raw student weights of every module, keys "<module>.<param>"
        optimizer.safetensors  optimizer tensors; their structure is in state.json
        rng.safetensors        per-rank RNG states ("rank<r>/<name>")
        state.json             step, scheduler, EMA counters, optimizer structure, free trainer metadata

Tied/shared tensors are stored once; the other names are recorded as aliases in the file metadata.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class TrainState:
    """Everything beyond the inference weights that an exact resume needs."""

    step: int
    modules: dict[str, dict[str, Tensor]]  # raw (student) weights per module
    optimizer: dict  # torch optimizer.state_dict()
    rng: list[dict[str, Tensor]] = field(default_factory=list)  # per rank, from rng_state_tensors()
    meta: dict = field(default_factory=dict)  # JSON: scheduler, EMA counters, trainer config, world size


@dataclass
class Checkpoint:
    """A loaded checkpoint: config, inference weights per module, attached JSON, optional train state."""

    path: Path
    config: dict
    weights: dict[str, dict[str, Tensor]]
    extra_json: dict[str, dict]
    train_state: TrainState | None = None

    @property
    def kind(self) -> str:
        return self.config["kind"]

    def load_into(self, modules: Mapping[str, nn.Module]) -> None:
        """Load the inference weights of each named module, strictly (keys and shapes must match)."""
        _load_named(self.weights, modules, f"{self.path / WEIGHTS}")


# ---------------------------------------------------------------------------------------------- tensors


def _state_of(module: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(module.state_dict() if isinstance(module, nn.Module) else module)


def _write_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """save_file with shared/tied tensors stored once (aliases in metadata) and views made contiguous."""
    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name!r} is a {type(t).__name__}, not a tensor; only tensors go into {path.name}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and ident in seen:
            aliases[name] = seen[ident]  # the same tensor under two names (tied weights)
            continue
        seen[ident] = name
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or not t.is_contiguous() or t.numel() != t.untyped_storage().nbytes() // t.element_size():
            t = t.contiguous().clone()  # a view into someone else's storage: give it its own
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    meta = dict(metadata or {})
    meta["aliases"] = json.dumps(aliases)
    save_file(out, str(path), metadata=meta)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete or not a checkpoint directory")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); the checkpoint "
                         "is damaged: use another copy or save it again") from err
    for name, target in aliases.items():
        if target not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is recorded as an alias of {target!r}, which the file does not "
                             "hold; the checkpoint is damaged: use another copy or save it again")
        tensors[name] = tensors[target]
    return tensors


def read_json(path: str | Path):
    """A JSON file's content; a missing, truncated or garbled file is an error naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the file is truncated or damaged; restore it or "
                         "write it again") from err


def _split(flat: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{"model.a.b": t} -> {"model": {"a.b": t}}."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        module, _, rest = key.partition(".")
        out.setdefault(module, {})[rest] = t
    return out


def _flat(named: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    out = {}
    for module, state in named.items():
        if not _NAME.match(module):
            raise ValueError(f"module name {module!r} must be letters, digits, '_' or '-' (no dots)")
        out.update({f"{module}.{k}": v for k, v in state.items()})
    return out


# ------------------------------------------------------------------------------------- JSON + tensor trees


def pack_tree(obj, tensors: dict[str, Tensor], prefix: str = "t"):
    """A JSON-able structure for ``obj`` with its tensors / numpy arrays moved into ``tensors``."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, Mapping):
        return {"__dict__": [[k, pack_tree(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_tree(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_tree(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"cannot store a {type(obj).__name__} at {prefix!r} without pickle; convert it to JSON types")


def unpack_tree(obj, tensors: Mapping[str, Tensor]):
    """Inverse of pack_tree."""
    if isinstance(obj, list):
        return [unpack_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(unpack_tree(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: unpack_tree(v, tensors) for k, v in obj["__dict__"]}
    return obj


# ------------------------------------------------------------------------------------------------ save


def save_checkpoint(
    path: str | Path,
    modules: Mapping[str, nn.Module | Mapping[str, Tensor]],
    config: dict,
    extra_json: Mapping[str, dict] | None = None,
    train_state: TrainState | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temporary sibling, then rename over ``path``).

    modules: name -> module (or state dict) holding the INFERENCE weights (pass the EMA copy for the
    EMA-tracked module). config: JSON dict with a ``kind`` string. extra_json: name -> dict written
    as ``<name>.json``. The previous checkpoint at ``path`` stays intact until the new one is complete.
    """
    path = Path(path)
    if not isinstance(config.get("kind"), str) or not config["kind"]:
        raise ValueError("checkpoint config needs a 'kind' string, e.g. {'kind': 'worldmodel.pretrain', ...}")
    extra_json = dict(extra_json or {})
    for name in extra_json:
        if not _NAME.match(name) or name == "config":
            raise ValueError(f"extra_json name {name!r} must be letters/digits/_/- and not 'config'")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _sibling(path, "tmp"), _sibling(path, "old")
    recover_checkpoint(path)  # leftovers of an interrupted save: the newest complete copy becomes ``path``
    tmp.mkdir()
    try:
        _write_tensors(tmp / WEIGHTS, _flat({k: _state_of(m) for k, m in modules.items()}), {"format": "pt"})
        for name, data in extra_json.items():
            (tmp / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True))
        if train_state is not None:
            _write_train_state(tmp / TRAIN_STATE, train_state)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))  # last: marks the copy complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)  # a crash from here to the next line leaves .old and a complete .tmp: both resumable
    os.replace(tmp, path)
    _discard(old)
    return path


# --------------------------------------------------------------------------------- crash recovery


def _sibling(path: Path, what: str) -> Path:
    return path.parent / f".{path.name}.{what}"


def _discard(directory: Path) -> None:
    """Delete a directory by renaming it out of the way first, so a crash mid-delete never leaves a
    half-deleted directory under a name that recovery would consider."""
    if not directory.exists():
        return
    trash = _sibling(directory, "trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(directory, trash)
    shutil.rmtree(trash)


def checkpoint_step(directory: str | Path, train_state: bool = False) -> int | None:
    """The training step of a COMPLETE checkpoint directory (-1 when it records none), else None.

    Complete: config.json parses (it is written last) and the weights, plus the train state when
    ``train_state``, are present.
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not (directory / WEIGHTS).is_file():
        return None
    state_files = ("state.json", "modules.safetensors", "optimizer.safetensors", "rng.safetensors")
    if train_state and not all((directory / TRAIN_STATE / f).is_file() for f in state_files):
        return None
    step = config.get("train_step")
    return int(step) if isinstance(step, int) else -1


def latest_checkpoint(path: str | Path, train_state: bool = True) -> Path | None:
    """The newest complete checkpoint among ``path`` and what an interrupted save may have left beside it
    (``.<name>.old``, ``.<name>.tmp``); None when there is none. Ties go to ``path``. Reads only."""
    path = Path(path)
    best, best_step = None, None
    for candidate in (path, _sibling(path, "old"), _sibling(path, "tmp")):
        step = checkpoint_step(candidate, train_state)
        if step is not None and (best_step is None or step > best_step):
            best, best_step = candidate, step
    return best


def recover_checkpoint(path: str | Path) -> Path | None:
    """Put the newest complete copy (``latest_checkpoint``, weights only required) at ``path`` and delete the
    other leftovers; the only complete copy is never deleted. Returns ``path`` or None when nothing is complete."""
    path = Path(path)
    best = latest_checkpoint(path, train_state=False)
    if best is not None and best != path:
        _discard(path)  # incomplete, or older than the copy being promoted
        os.replace(best, path)
    for leftover in (_sibling(path, "tmp"), _sibling(path, "old")):
        _discard(leftover)
    return path if best is not None else None


def _write_train_state(directory: Path, state: TrainState) -> None:
    directory.mkdir()
    _write_tensors(directory / "modules.safetensors", _flat(state.modules))
    opt_tensors: dict[str, Tensor] = {}
    opt_tree = pack_tree(state.optimizer, opt_tensors, "opt")
    save_file(opt_tensors, str(directory / "optimizer.safetensors"))
    rng = {f"rank{r}/{k}": v.detach().cpu().contiguous().clone() for r, d in enumerate(state.rng) for k, v in d.items()}
    save_file(rng, str(directory / "rng.safetensors"))
    meta = {"step": int(state.step), "optimizer": opt_tree, "rng_ranks": len(state.rng), "meta": state.meta}
    (directory / "state.json").write_text(json.dumps(meta, indent=1))


# ------------------------------------------------------------------------------------------------ load


def load_checkpoint(
    path: str | Path, expected_kind: str | Sequence[str] | None = None, train_state: bool = False
) -> Checkpoint:
    """Read a checkpoint directory; with ``expected_kind`` a checkpoint of another kind is an error."""
    path = Path(path)
    if not (path / CONFIG).exists():
        hint = ""
        backup = latest_checkpoint(path, train_state=False)
        if backup is not None:
            hint = (f" (a complete previous copy is at {backup}: a save was interrupted; the Trainer's resume='auto' "
                    "uses it, or rename it back)")
        raise FileNotFoundError(f"{path / CONFIG} not found: {path} is not a checkpoint directory{hint}")
    config = read_json(path / CONFIG)
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG} must hold a JSON object with a 'kind', got {type(config).__name__}")
    kind = config.get("kind")
    if expected_kind is not None:
        allowed = (expected_kind,) if isinstance(expected_kind, str) else tuple(expected_kind)
        if kind not in allowed:
            wanted = " or ".join(map(repr, allowed))
            raise ValueError(f"the checkpoint {path} was written by {kind!r}, expected {wanted}: "
                             "pass a checkpoint of the right kind")
    weights = _split(_read_tensors(path / WEIGHTS))
    extra = {p.stem: read_json(p) for p in sorted(path.glob("*.json")) if p.name != CONFIG}
    state = _read_train_state(path / TRAIN_STATE) if train_state else None
    return Checkpoint(path=path, config=config, weights=weights, extra_json=extra, train_state=state)


def _read_train_state(directory: Path) -> TrainState:
    if not (directory / "state.json").exists():
        raise FileNotFoundError(f"{directory}/state.json not found: this checkpoint holds inference weights only "
                                "and cannot be resumed; start a fresh run or point to one saved by the Trainer")
    meta = read_json(directory / "state.json")
    modules = _split(_read_tensors(directory / "modules.safetensors"))
    optimizer = unpack_tree(meta["optimizer"], _read_tensors(directory / "optimizer.safetensors"))
    rng_flat = _read_tensors(directory / "rng.safetensors")
    rng = [{k.split("/", 1)[1]: v for k, v in rng_flat.items() if k.startswith(f"rank{r}/")}
           for r in range(meta["rng_ranks"])]
    return TrainState(step=int(meta["step"]), modules=modules, optimizer=optimizer, rng=rng, meta=meta["meta"])


def check_state(module: nn.Module, state: Mapping[str, Tensor], where: str,
                allow_missing_prefixes: Sequence[str] = ()) -> list[str]:
    """Raise ValueError naming missing / unexpected / mis-shaped keys; return the allowed missing keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    allowed = [k for k in missing if any(k.startswith(p) for p in allow_missing_prefixes)]
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:10]))
    if problems:
        raise ValueError(f"{where} does not fit the model: {'. '.join(problems)}. Build the model with the "
                         "checkpoint's config (config.json) or pass allow_missing_prefixes for new heads")
    return allowed


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], where: str = "state dict") -> None:
    """Load every key, with shapes checked first so errors name the keys."""
    check_state(module, state, where)
    module.load_state_dict(dict(state), strict=True)


def load_weights_partial(module: nn.Module, state: Mapping[str, Tensor], allow_missing_prefixes: Sequence[str] = (),
                         where: str = "state dict") -> list[str]:
    """Load ``state`` where only keys under ``allow_missing_prefixes`` may be missing (new heads keep their init).

    Unexpected keys and shape mismatches are errors. Returns the keys left at initialisation.
    """
    left = check_state(module, state, where, allow_missing_prefixes)
    module.load_state_dict(dict(state), strict=False)
    return left


def _load_named(weights: Mapping[str, Mapping[str, Tensor]], modules: Mapping[str, nn.Module], where: str) -> None:
    absent = [n for n in modules if n not in weights]
    if absent:
        raise ValueError(f"{where} has no weights for module(s) {absent}; it holds {sorted(weights)}")
    for name, module in modules.items():
        load_state_strict(module, weights[name], f"{where} [{name}]")


__all__ = [
    "Checkpoint", "TrainState", "save_checkpoint", "load_checkpoint", "load_state_strict", "load_weights_partial",
    "check_state", "pack_tree", "unpack_tree", "checkpoint_step", "latest_checkpoint", "recover_checkpoint",
    "read_json",
]
