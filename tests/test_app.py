"""The sampler page (bar_lightning.app): its JSON API on tiny trained checkpoints, request validation shared with
the command line, the lock, the class names, and the `python -m bar_lightning.app` entry point."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bar_lightning.app import resolve_class_names, training_class_names
from bar_lightning.config.schema import ConfigError, check_sampling

from .app_helpers import ROOT, app_config, call, serving


@pytest.fixture(scope="module")
def server(generator_of_tiny_tokenizer, tokenizer_checkpoint):
    """The page on a tiny generator (10 classes, 16 tokens of 6 bits) and the tiny tokenizer (16 px)."""
    with serving(f"generator.checkpoint={generator_of_tiny_tokenizer}",
                 f"tokenizer.checkpoint={tokenizer_checkpoint}", "device=cpu") as running:
        yield running


def decoded(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    assert image.format == "PNG"
    return image


def test_a_generation_returns_the_requested_number_of_png_images_of_the_tokenizer_size_with_timings(server):
    status, result = call(server, "/api/generate", {"class_id": 3, "num_images": 3, "seed": 7})
    assert status == 200, result
    assert [column["guidance_scale"] for column in result["columns"]] == [2.0]  # the checkpoint's guidance
    images = result["columns"][0]["images"]
    assert len(images) == 3
    for url in images:
        image = decoded(url)
        assert image.size == (16, 16) and image.mode == "RGB"
    # The sampling settings trained with, as evaluate.py would use them.
    assert result["settings"] == {"guidance_scale": 2.0, "temperature": 1.0, "tokens_allocation": [2, 2, 2],
                                  "random_order": False}
    assert result["class_id"] == 3 and result["class_name"] is None and result["image_size"] == 16
    timings = result["timings_s"]
    assert set(timings) == {"sampling", "decoding", "encoding_png", "waiting", "generation"}
    assert timings["generation"] >= timings["sampling"] > 0 and result["images_per_second"] > 0


def test_the_same_seed_gives_the_same_images_and_another_seed_others(server):
    request = {"class_id": 1, "num_images": 4, "seed": 11, "temperature": "1.5"}
    first, second = call(server, "/api/generate", request)[1], call(server, "/api/generate", request)[1]
    other = call(server, "/api/generate", {**request, "seed": 12})[1]
    assert first["columns"] == second["columns"]
    assert first["columns"][0]["images"] != other["columns"][0]["images"]


def test_the_guidance_grid_has_one_column_per_value_each_sampled_from_the_same_seed(server):
    status, grid = call(server, "/api/generate", {"class_id": 2, "num_images": 2, "seed": 5,
                                                  "guidance_grid": {"min": 1, "max": "4", "steps": 4}})
    assert status == 200, grid
    assert [column["guidance_scale"] for column in grid["columns"]] == [1.0, 2.0, 3.0, 4.0]
    assert all(len(column["images"]) == 2 for column in grid["columns"])
    # A column is the single request of its guidance: the columns differ by the guidance alone.
    single = call(server, "/api/generate", {"class_id": 2, "num_images": 2, "seed": 5, "guidance_scale": 3})[1]
    assert grid["columns"][2]["images"] == single["columns"][0]["images"]


def test_a_bad_schedule_is_answered_400_with_the_command_lines_validation_message(server):
    status, answer = call(server, "/api/generate", {"tokens_allocation": "2,2,3"})
    assert status == 400
    assert "tokens_allocation=[2, 2, 3] sums to 7" in answer["error"] and "sum to 6" in answer["error"]
    with pytest.raises(ConfigError) as from_the_cli:
        check_sampling(OmegaConf.create({"guidance_scale": 2.0, "temperature": 1.0, "tokens_allocation": [2, 2, 3],
                                         "precision": "fp32"}), 6, "mbm")
    assert answer["error"] == str(from_the_cli.value)
    for schedule, words in (([3, 2, 1], "non-decreasing"), ("2,x,4", "'2,x,4'"), ([2, 2.5, 1.5], "integers")):
        status, answer = call(server, "/api/generate", {"tokens_allocation": schedule})
        assert status == 400 and words in answer["error"], answer


@pytest.mark.parametrize(("request_body", "words"), [
    ({"class_id": 10}, "class_id=10 is not a class of this generator; use 0..9"),
    ({"class_id": -1}, "class_id=-1"),
    ({"class_id": "shoe"}, "class_id='shoe' is not a whole number"),
    ({"class_id": True}, "class_id=True"),
    ({"guidance_scale": 0.5}, "sampling.guidance_scale=0.5 must be a finite number >= 1"),
    ({"temperature": "NaN"}, "sampling.temperature=nan"),
    ({"num_images": 0}, "num_images=0"),
    ({"seed": -3}, "seed=-3"),
    ({"num_images": 40, "guidance_grid": {"min": 1, "max": 3, "steps": 2}}, "80 images is over max_images=64"),
    ({"guidance_grid": {"min": 0.5, "max": 3, "steps": 3}}, "guidance_grid: sampling.guidance_scale=0.5"),
    ({"guidance_grid": {"min": 3, "max": 1, "steps": 3}}, "guidance_grid.max=1.0 is below guidance_grid.min=3.0"),
    ({"guidance_grid": {"min": 1, "max": 3, "steps": 13}}, "guidance_grid.steps=13 must be in 2..12"),
    ({"guidance_grid": {"min": 1}}, "must be an object with ['min', 'max', 'steps']"),
    ({"clas_id": 1}, "unknown request key(s) ['clas_id']"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_values_are_answered_400_naming_the_value(server, request_body, words):
    status, answer = call(server, "/api/generate", request_body)
    assert status == 400
    assert words in answer["error"], answer


def test_the_page_and_the_info_are_served_and_requests_from_elsewhere_are_refused(server):
    status, page = call(server, "/")
    assert status == 200 and b'id="generate-button"' in page
    assert not re.search(rb'(src|href)="(https?:)?//', page)  # self-contained: works offline
    status, info = call(server, "/api/info")
    assert status == 200
    assert info["num_classes"] == 10 and info["class_names"] is None and info["image_size"] == 16
    assert info["defaults"]["tokens_allocation"] == [2, 2, 2] and info["bits_per_step"] == 6
    assert call(server, "/nothing")[0] == 404
    # A form post (no CORS preflight from another site's page) and a rebinding host name are refused.
    assert call(server, "/api/generate", b"class_id=1", content_type="application/x-www-form-urlencoded")[0] == 415
    assert call(server, "/api/info", headers={"Host": "attacker.example:80"})[0] == 403
    assert call(server, "/api/generate", b"{not json")[0] == 400


def test_one_generation_runs_at_a_time(server):
    """A request that arrives while the model is busy waits for it, instead of sharing the model."""
    results = {}
    sampler = server.sampler
    with sampler._lock:  # another generation in progress
        worker = threading.Thread(target=lambda: results.update(answer=call(server, "/api/generate", {})))
        worker.start()
        time.sleep(0.5)
        assert "answer" not in results
        assert call(server, "/api/info")[0] == 200  # the page still answers meanwhile
    worker.join(timeout=60)
    status, answer = results["answer"]
    assert status == 200 and answer["timings_s"]["waiting"] >= 0.4


def test_class_names_from_a_file_or_from_the_data_the_generator_was_trained_on(tmp_path):
    names_file = tmp_path / "names.txt"
    names_file.write_text("cat\ndog\n")
    assert resolve_class_names(str(names_file), OmegaConf.create({}), 2) == ["cat", "dog"]
    with pytest.raises(ConfigError, match="class_names has 2 names but the generator has 3 classes"):
        resolve_class_names(["cat", "dog"], OmegaConf.create({}), 3)
    with pytest.raises(FileNotFoundError, match="class_names="):
        resolve_class_names(str(tmp_path / "missing.json"), OmegaConf.create({}), 2)
    # A checkpoint of training on pretokenized data: its token folder names the shards, whose converter wrote
    # classes.json beside them (the demo's chain).
    shards, tokens = tmp_path / "shards", tmp_path / "tokens"
    shards.mkdir()
    tokens.mkdir()
    (shards / "classes.json").write_text(json.dumps({"classes": ["Coat", "Bag"]}))
    (tokens / "metadata.json").write_text(json.dumps(
        {"provenance": {"inputs": {"data": {"shards": str(shards / "train.index.json"), "image_folder": None}}}}))
    checkpoint = tmp_path / "generator.ckpt"
    torch.save({"hyper_parameters": {"model": {}, "sampling": {}}, "state_dict": {},
                "datamodule_hyper_parameters": {"root": str(tokens)}}, checkpoint)
    source = OmegaConf.create({"checkpoint": str(checkpoint)})
    assert training_class_names(source)[0] == ["Coat", "Bag"]
    assert resolve_class_names(None, source, 2) == ["Coat", "Bag"]
    assert resolve_class_names(None, source, 5) is None  # another class count: indices, not wrong names


def test_the_config_needs_a_tokenizer_and_one_generator_source(generator_of_tiny_tokenizer):
    with pytest.raises(ConfigError, match="the sampler page shows images"):
        app_config(f"generator.checkpoint={generator_of_tiny_tokenizer}")
    with pytest.raises(ConfigError, match="give exactly one of generator.checkpoint"):
        app_config("tokenizer.checkpoint=x.ckpt")
    with pytest.raises(ConfigError, match="port=70000 is not a TCP port"):
        app_config("generator.checkpoint=g.ckpt", "tokenizer.checkpoint=t.ckpt", "port=70000")


def test_the_command_line_serves_the_page_and_logs_its_url(generator_of_tiny_tokenizer, tokenizer_checkpoint,
                                                           tmp_path):
    command = [sys.executable, "-m", "bar_lightning.app", f"generator.checkpoint={generator_of_tiny_tokenizer}",
               f"tokenizer.checkpoint={tokenizer_checkpoint}", "port=0", "device=cpu", "print_config=false",
               "sampling.guidance_scale=1.5", f"hydra.run.dir={tmp_path}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "BAR_PROGRESS": "0"})
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Sampler page: "):
                break
        match = re.match(r"Sampler page: (http://127\.0\.0\.1:\d+/)", lines[-1])
        assert match, "".join(lines)
        with urllib.request.urlopen(match.group(1) + "api/info", timeout=30) as response:
            info = json.loads(response.read())
        assert info["defaults"]["guidance_scale"] == 1.5  # the command line's value wins over the checkpoint's
    finally:
        process.terminate()
        process.wait(timeout=30)
    bad = subprocess.run([*command[:5], "sampling.tokens_allocation=[1,1]", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1
    assert "sampling.tokens_allocation=[1, 1]" in bad.stderr and "sum to 6" in bad.stderr


def test_a_port_in_use_is_named_with_the_fix(server):
    from bar_lightning.app import make_server

    port = server.server_address[1]
    with pytest.raises(ConfigError, match=f"cannot listen on host=127.0.0.1 port={port} .*port=0 for any free one"):
        make_server(server.sampler, "127.0.0.1", port)
