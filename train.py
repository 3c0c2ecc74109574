"""Train a BAR generator or tokenizer: `python train.py experiment=bar_b` (see README for more)."""

import hydra
from omegaconf import DictConfig

from bar_lightning.cli import check_overrides, report_user_errors
from bar_lightning.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    check_overrides("train")
    main()
