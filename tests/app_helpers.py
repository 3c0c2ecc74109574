"""The sampler page's server for tests: composed from conf/app.yaml as the command line composes it, served from a
thread on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from bar_lightning.app import Sampler, SamplerServer, make_server
from bar_lightning.config.derive import derive_evaluation_sampling
from bar_lightning.config.schema import validate_app_config

ROOT = Path(__file__).resolve().parents[1]


def app_config(*overrides: str):
    """conf/app.yaml with `overrides`, validated, the sampling settings taken from the generator as the CLI does."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("app", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"  # the Hydra run folder: the page writes nothing there
    return derive_evaluation_sampling(validate_app_config(cfg), list(overrides))


@contextlib.contextmanager
def serving(*overrides: str) -> Iterator[SamplerServer]:
    """A running server of conf/app.yaml + `overrides` (port 0: a free one); shut down on exit."""
    server = make_server(Sampler.from_config(app_config(*overrides)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, name="sampler-page", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def call(server: SamplerServer, path: str, body: Any = None, *, content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | bytes]:
    """(status, parsed JSON or raw bytes) of GET `path`, or of POST with `body` as JSON."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw
