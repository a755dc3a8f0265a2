"""Linear probes per block of pretrained checkpoints. `python scripts/probe.py checkpoints=[A,B] names=[x,y]`.

Config: configs/probe.yaml. Writes probe_<modality>.json, .md and .png into the Hydra run dir.
"""

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from worldmodel.builders import resolve_device  # noqa: E402
from worldmodel.config import validate  # noqa: E402  (registers the structured configs)
from worldmodel.probe import probe_checkpoint, resolve_checkpoint, write_report  # noqa: E402

log = logging.getLogger("probe")


@hydra.main(config_path="../configs", config_name="probe", version_base="1.3")
def main(cfg: DictConfig) -> None:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    paths = [Path(p) for p in cfg.checkpoints or []]
    if not paths:
        raise ValueError("no checkpoints to probe: pass checkpoints=[DIR1,DIR2] (pretraining run or checkpoint dirs)")
    names = list(cfg.names) if cfg.names else [resolve_checkpoint(p).parent.name for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"names={names} must be distinct and one per checkpoint ({len(paths)}); fix names=[...]")
    device = resolve_device(str(cfg.device))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    for modality in cfg.modalities:
        results = {}
        for name, path in zip(names, paths):
            results[name] = probe_checkpoint(
                path, modality=str(modality), num_samples=int(cfg.num_samples), tau=float(cfg.tau), text=str(cfg.text),
                blocks=list(cfg.blocks) if cfg.blocks is not None else None, train_frac=float(cfg.train_frac),
                batch_size=int(cfg.batch_size), device=device, seed=int(cfg.seed))
            log.info("%s / %s: %s", name, modality, {lab: results[name].best(lab) for lab in results[name].metric})
        written = write_report(results, out_dir, stem=f"probe_{modality}",
                               title=f"linear probes, {modality}, tau={cfg.tau}")
        log.info("wrote %s", ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
