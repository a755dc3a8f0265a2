"""Multi-modal Self-Flow pretraining. `python scripts/pretrain.py [key=value ...]` (configs/pretrain.yaml)."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from worldmodel.config import validate  # noqa: E402  (registers the structured configs)
from worldmodel.pretrain import run_pretraining  # noqa: E402
from worldmodel.run_summary import run_summary  # noqa: E402


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = run_pretraining(validate(cfg), HydraConfig.get().runtime.output_dir)
    logging.getLogger("pretrain").info("done: %s", result)
    print(run_summary(result["output_dir"]))


if __name__ == "__main__":
    main()
