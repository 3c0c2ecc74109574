"""Sample from a generator: `python evaluate.py generator.checkpoint=<ckpt> sampling=bar_b`.

Writes `samples_bits.npz` (bits of every sample and its class) in the Hydra run directory.
"""

import hydra
from omegaconf import DictConfig

from bar_lightning.config.schema import validate_evaluate_config
from bar_lightning.eval.sampling import run_sampling


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_sampling(validate_evaluate_config(cfg))


if __name__ == "__main__":
    main()
