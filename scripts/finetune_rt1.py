"""RT-1 video-action fine-tuning. `python scripts/finetune_rt1.py [key=value ...]` (configs/finetune_rt1.yaml)."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from worldmodel.config import validate  # noqa: E402  (registers the structured configs)
from worldmodel.finetune import run_finetuning  # noqa: E402
from worldmodel.run_summary import run_summary  # noqa: E402


@hydra.main(config_path="../configs", config_name="finetune_rt1", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = run_finetuning(validate(cfg), HydraConfig.get().runtime.output_dir)
    logging.getLogger("finetune_rt1").info("policy checkpoint: %s", result["checkpoint"])
    print(run_summary(result["output_dir"]))


if __name__ == "__main__":
    main()
