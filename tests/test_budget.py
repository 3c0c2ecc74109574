"""The bit-budget calculator: bits per image and equivalent codebook sizes of discrete and continuous latents."""

import math

import pytest

from bar_lightning import budget


def test_a_binary_fsq_token_of_k_bits_is_a_codebook_of_two_to_the_k():
    bar_fsq = budget.discrete("x", image_size=256, tokens=256, bits_per_token=16)
    assert bar_fsq.bits_per_image == 4096
    assert bar_fsq.codebook_size_per_token() == "2^16 = 65,536"
    assert bar_fsq.bits_per_pixel == pytest.approx(4096 / 256**2)


def test_a_continuous_channel_counts_as_a_16_bit_float():
    sd_vae = budget.continuous("sd", image_size=256, tokens=32 * 32, channels=4)
    assert sd_vae.bits_per_image == 32 * 32 * 4 * 16 == 65536
    # A discrete tokenizer with 256 tokens would need 256 bits per token to hold as much.
    assert sd_vae.codebook_size_at(256) == "2^256"
    assert budget.continuous("fp32", image_size=256, tokens=1024, channels=4, float_bits=32).bits_per_image == 131072


def test_the_model_zoo_rows_come_from_the_models_themselves():
    tokenizers = {row.name: row for row in budget.zoo_tokenizers()}
    assert tokenizers["tokenizer bar_fsq_16bits"].tokens == 256
    assert tokenizers["tokenizer bar_fsq_16bits"].bits_per_image == 4096
    assert tokenizers["tokenizer bar_fsq_10bits_res512"].tokens == 1024
    assert tokenizers["tokenizer bar_fsq_10bits_res512"].bits_per_image == 10240
    assert tokenizers["tokenizer conv_tiny"].tokens == 16  # 16 px, 4x downsampling
    generators = {row.name.split()[1]: row for row in budget.zoo_generators()}
    # Patching regroups the same 4096 bits into fewer, larger autoregressive steps.
    assert (generators["bar_b"].tokens, generators["bar_b"].bits_per_token) == (256, 16)
    assert (generators["bar_b_patch2"].tokens, generators["bar_b_patch2"].bits_per_token) == (64, 64)
    assert (generators["bar_b_patch4"].tokens, generators["bar_b_patch4"].bits_per_token) == (16, 256)
    assert {row.bits_per_image for name, row in generators.items() if name != "bar_l_res512"} == {4096}
    assert generators["bar_l_res512"].bits_per_image == 10240
    assert generators["bar_l_res512"].image_size == 512


def test_powers_of_two_are_printed_exactly_or_as_exponents():
    assert budget.power_of_two(10) == "2^10 = 1,024"
    assert budget.power_of_two(64) == "2^64"
    assert budget.power_of_two(math.log2(1000)) == "2^9.97"


def test_the_command_prints_the_zoo_and_the_users_latent(capsys):
    assert budget.main(["--bits-per-token", "18", "--downsample", "16"]) == 0
    out = capsys.readouterr().out
    assert "bar_fsq_16bits" in out and "SD-VAE" in out
    yours = next(line for line in out.splitlines() if "yours" in line)
    assert "4,608" in yours and "2^18 = 262,144" in yours  # 256 tokens x 18 bits


def test_a_codebook_size_is_turned_into_bits(capsys):
    assert budget.main(["--zoo", "false", "--codebook-size", "16384", "--image-size", "256", "--downsample", "16"]) == 0
    yours = next(line for line in capsys.readouterr().out.splitlines() if "yours" in line)
    assert "3,584" in yours  # 256 tokens x 14 bits


@pytest.mark.parametrize(("argv", "message"), [
    (["--zoo", "false", "--codebook-size", "1000"], "--codebook-size 1000 is not a power of two"),
    (["--zoo", "false", "--bits-per-token", "16", "--downsample", "24"], "not a multiple of the downsampling 24"),
    (["--zoo", "false", "--bits-per-token", "16", "--channels", "4"], "give one of"),
    (["--zoo", "false"], "nothing to show"),
    (["--zoo", "false", "--bits-per-token", "0"], "must be positive"),
])
def test_questions_without_an_answer_are_refused_naming_the_value(capsys, argv, message):
    assert budget.main(argv) == 2
    assert message in capsys.readouterr().err
