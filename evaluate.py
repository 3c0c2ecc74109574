"""Evaluate a generator: `python evaluate.py generator.checkpoint=<ckpt> tokenizer.checkpoint=<ckpt> sampling=bar_b`.

Writes samples_bits.npz, samples.npz (ADM format) and metrics.json in the Hydra run directory; `speed.enabled=true`
reports images/s instead. Several processes: `torchrun --nproc_per_node 8 evaluate.py ...`.
"""

import hydra
from omegaconf import DictConfig

from bar_lightning.cli import check_overrides, report_user_errors
from bar_lightning.config.derive import command_line_overrides, derive_evaluation_sampling
from bar_lightning.config.printing import print_config_tree
from bar_lightning.config.schema import validate_evaluate_config
from bar_lightning.eval.evaluate import run_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    # The sampling settings are the generator's own unless the command line chooses them.
    cfg = derive_evaluation_sampling(validate_evaluate_config(cfg), command_line_overrides())
    if cfg.print_config:
        print_config_tree(cfg)
    run_evaluation(cfg)


if __name__ == "__main__":
    check_overrides("evaluate")
    main()
