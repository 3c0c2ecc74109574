"""Pretokenize a dataset: `python pretokenize.py tokenizer.checkpoint=<ckpt> data.shards=<pattern> output_dir=<dir>`.

Several processes: `torchrun --nproc_per_node 8 pretokenize.py ...` (inputs are split by rank).
"""

import hydra
from omegaconf import DictConfig

from bar_lightning.pretokenize import run_pretokenize


@hydra.main(version_base="1.3", config_path="conf", config_name="pretokenize")
def main(cfg: DictConfig) -> None:
    run_pretokenize(cfg)


if __name__ == "__main__":
    main()
