"""Bit budgets: how much information a tokenizer's latent can hold, for discrete and continuous tokenizers alike.

`python -m bar_lightning.budget` prints, for every tokenizer and generator of the model zoo (`conf/`), the bits per
image and the codebook size one token (or one autoregressive step) would need to carry the same bits, then the
same for continuous tokenizers of common shapes, so that the two kinds are compared on one axis as the paper does:

* a discrete latent of `tokens` tokens with a codebook of `C` entries holds `tokens * log2(C)` bits; a binary-FSQ
  token of `k` bits is a codebook of `2**k` entries;
* a continuous latent of `tokens` tokens of `channels` numbers holds `tokens * channels * float_bits` bits, with
  `float_bits = 16` (the paper counts each channel as a 16-bit float).

User values:

    python -m bar_lightning.budget --image-size 256 --downsample 16 --bits-per-token 18      # a discrete tokenizer
    python -m bar_lightning.budget --image-size 256 --downsample 8 --channels 4              # a continuous one
    python -m bar_lightning.budget --zoo false --image-size 512 --downsample 16 --codebook-size 16384

Equivalent codebook sizes are printed as powers of two (`2^16`) and, when they fit in a few digits, as integers.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import OmegaConf

from bar_lightning.paths import config_dir

FLOAT_BITS = 16  # the paper's count of a continuous channel: one half-precision number
GENERATOR_EXPERIMENTS = ("bar_b_patch4", "bar_b_patch2", "bar_b", "bar_l", "bar_l_res512")
# Continuous latents of common shapes for a 256 px image: (name, tokens, channels per token).
CONTINUOUS_REFERENCES = (
    ("SD-VAE f8c4 (LDM, DiT)", 32 * 32, 4),
    ("VA-VAE f16c32 (LightningDiT)", 16 * 16, 32),
    ("RAE, DINOv2-B features (256 x 768)", 16 * 16, 768),
)
REFERENCE_IMAGE_SIZE = 256


class BudgetError(ValueError):
    """A bit-budget question that has no answer (a size that does not divide, a non-positive count)."""


@dataclass(frozen=True)
class Budget:
    """One latent: what it is, its number of tokens (or steps) and the bits each holds."""

    name: str
    kind: str  # "discrete" or "continuous"
    image_size: int
    tokens: int
    bits_per_token: int

    @property
    def bits_per_image(self) -> int:
        return self.tokens * self.bits_per_token

    @property
    def bits_per_pixel(self) -> float:
        return self.bits_per_image / (self.image_size * self.image_size)

    def codebook_size_per_token(self) -> str:
        """The codebook size one token of this latent amounts to: 2^bits_per_token."""
        return power_of_two(self.bits_per_token)

    def codebook_size_at(self, tokens: int) -> str:
        """The codebook size a discrete tokenizer with `tokens` tokens needs to hold the same bits per image."""
        return power_of_two(self.bits_per_image / tokens)


def power_of_two(exponent: float) -> str:
    """`2^16 = 65,536`; non-integer exponents as `2^12.5`; large ones as the power alone."""
    if float(exponent).is_integer():
        text = f"2^{int(exponent)}"
        return f"{text} = {2 ** int(exponent):,}" if exponent <= 24 else text
    return f"2^{exponent:.2f}"


def token_grid(image_size: int, downsample: int, *, what: str) -> int:
    """Tokens of a `image_size` image under a `downsample` x `downsample` patch (refuses sizes that do not divide)."""
    if image_size <= 0 or downsample <= 0:
        raise BudgetError(f"{what}: image size {image_size} and downsampling {downsample} must be positive")
    if image_size % downsample:
        raise BudgetError(f"{what}: image size {image_size} is not a multiple of the downsampling {downsample}; "
                          "pick sizes whose ratio is an integer")
    return (image_size // downsample) ** 2


def discrete(name: str, *, image_size: int, tokens: int, bits_per_token: int) -> Budget:
    if tokens <= 0 or bits_per_token <= 0:
        raise BudgetError(f"{name}: tokens ({tokens}) and bits per token ({bits_per_token}) must be positive")
    return Budget(name, "discrete", image_size, tokens, bits_per_token)


def continuous(name: str, *, image_size: int, tokens: int, channels: int, float_bits: int = FLOAT_BITS) -> Budget:
    if channels <= 0 or float_bits <= 0:
        raise BudgetError(f"{name}: channels ({channels}) and float bits ({float_bits}) must be positive")
    return Budget(name, "continuous", image_size, tokens, channels * float_bits)


def zoo_tokenizers() -> list[Budget]:
    """The tokenizers of `conf/model/tokenizer/`, each built on the meta device (no memory, no weights) so that its
    token grid is the model's own, whatever its family computes it from."""
    import torch

    from bar_lightning.models.registry import TOKENIZER_FAMILIES

    budgets = []
    for path in sorted((config_dir() / "model" / "tokenizer").glob("*.yaml")):
        kwargs = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        family = kwargs.pop("family")
        with torch.device("meta"):
            tokenizer = TOKENIZER_FAMILIES[family](**kwargs)
        budgets.append(discrete(f"tokenizer {path.stem}", image_size=int(tokenizer.image_size),
                                tokens=int(tokenizer.num_tokens), bits_per_token=int(tokenizer.bits_per_token)))
    return budgets


def zoo_generators(experiments: Sequence[str] = GENERATOR_EXPERIMENTS) -> list[Budget]:
    """The released generators: one autoregressive step predicts `patch_size**2` tokens, so its 'token' holds
    `patch_size**2 * bits_per_token` bits (what the MBM head samples at once)."""
    from hydra import compose, initialize_config_dir

    budgets = []
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        for experiment in experiments:
            model = compose("train", overrides=[f"experiment={experiment}"]).model
            steps = int(model.num_tokens) // int(model.patch_size) ** 2
            image_size = int(round(math.sqrt(int(model.num_tokens)))) * 16  # the BAR-FSQ tokenizers' patch
            budgets.append(discrete(f"generator {experiment} (per AR step)", image_size=image_size, tokens=steps,
                                    bits_per_token=int(model.patch_size) ** 2 * int(model.bits_per_token)))
    return budgets


def continuous_references() -> list[Budget]:
    return [continuous(name, image_size=REFERENCE_IMAGE_SIZE, tokens=tokens, channels=channels)
            for name, tokens, channels in CONTINUOUS_REFERENCES]


def user_budget(args: argparse.Namespace) -> Budget | None:
    """The latent the command line describes, or None when it describes none."""
    given = [args.bits_per_token, args.codebook_size, args.channels]
    if all(value is None for value in given):
        return None
    if sum(value is not None for value in given) != 1:
        raise BudgetError("give one of --bits-per-token, --codebook-size (discrete) or --channels (continuous), "
                          f"not {sum(value is not None for value in given)}")
    tokens = args.tokens if args.tokens is not None else token_grid(args.image_size, args.downsample, what="yours")
    if args.channels is not None:
        return continuous("yours", image_size=args.image_size, tokens=tokens, channels=args.channels,
                          float_bits=args.float_bits)
    if args.codebook_size is not None:
        if args.codebook_size < 2:
            raise BudgetError(f"--codebook-size {args.codebook_size}: a codebook has at least 2 entries")
        bits = math.log2(args.codebook_size)
        if not bits.is_integer():
            raise BudgetError(f"--codebook-size {args.codebook_size} is not a power of two; bits per token would be "
                              f"{bits:.3f} — give --bits-per-token {math.ceil(bits)} or a power-of-two size")
        return discrete("yours", image_size=args.image_size, tokens=tokens, bits_per_token=int(bits))
    return discrete("yours", image_size=args.image_size, tokens=tokens, bits_per_token=args.bits_per_token)


def table(budgets: Sequence[Budget], *, compare_tokens: int) -> list[list[str]]:
    rows = [["latent", "kind", "image", "tokens", "bits/token", "bits/image", "bits/pixel", "codebook per token",
             f"codebook at {compare_tokens} tokens"]]
    for budget in budgets:
        rows.append([budget.name, budget.kind, f"{budget.image_size}px", str(budget.tokens),
                     str(budget.bits_per_token), f"{budget.bits_per_image:,}", f"{budget.bits_per_pixel:.4f}",
                     budget.codebook_size_per_token(), budget.codebook_size_at(compare_tokens)])
    return rows


def render(rows: list[list[str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    rich_table = Table(*rows[0], title="Bit budgets (continuous channels counted as "
                                       f"{FLOAT_BITS}-bit floats unless --float-bits says otherwise)")
    for row in rows[1:]:
        rich_table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(rich_table)
    return buffer.getvalue()


def parser() -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(prog="python -m bar_lightning.budget", description=__doc__.split("\n\n")[0])
    parsed.add_argument("--zoo", type=lambda text: text.lower() not in ("0", "false", "no"), default=True,
                        help="list the model zoo and the continuous references (default true)")
    parsed.add_argument("--image-size", type=int, default=256, help="your image size in pixels (default 256)")
    parsed.add_argument("--downsample", type=int, default=16, help="your tokenizer's spatial downsampling")
    parsed.add_argument("--tokens", type=int, default=None, help="your token count (instead of size/downsample)")
    parsed.add_argument("--bits-per-token", type=int, default=None, help="a discrete tokenizer's bits per token")
    parsed.add_argument("--codebook-size", type=int, default=None, help="a discrete tokenizer's codebook size")
    parsed.add_argument("--channels", type=int, default=None, help="a continuous tokenizer's channels per token")
    parsed.add_argument("--float-bits", type=int, default=FLOAT_BITS, help="bits per continuous channel")
    parsed.add_argument("--compare-tokens", type=int, default=256,
                        help="the last column: codebook a discrete tokenizer with this many tokens needs (256)")
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.compare_tokens <= 0:
            raise BudgetError(f"--compare-tokens {args.compare_tokens} must be positive")
        budgets = zoo_tokenizers() + zoo_generators() + continuous_references() if args.zoo else []
        mine = user_budget(args)
        if mine is not None:
            budgets.append(mine)
        if not budgets:
            raise BudgetError("nothing to show: --zoo false and no latent of your own (give --bits-per-token, "
                              "--codebook-size or --channels)")
    except BudgetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(table(budgets, compare_tokens=args.compare_tokens)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
