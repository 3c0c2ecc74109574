"""Pretokenize a dataset: `python pretokenize.py tokenizer.checkpoint=<ckpt> data.shards=<shards> output_dir=<dir>`.

Several processes: `torchrun --nproc_per_node 8 pretokenize.py ...` (inputs are split by rank). Each process decodes
its images in `num_workers` DataLoader workers (default auto: its share of the CPU cores; 0: in the process itself).
"""

import hydra
from omegaconf import DictConfig

from bar_lightning.cli import check_overrides, report_user_errors
from bar_lightning.pretokenize import run_pretokenize


@hydra.main(version_base="1.3", config_path="conf", config_name="pretokenize")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_pretokenize(cfg)


if __name__ == "__main__":
    check_overrides("pretokenize")
    main()
