"""The sampler page: `python -m bar_lightning.app generator.checkpoint=<ckpt> tokenizer.checkpoint=<ckpt>`.

One class-conditional generator and its tokenizer stay loaded behind a small HTTP server (the standard library's
`ThreadingHTTPServer`, nothing to install): `GET /` is a self-contained page (`app_page.html`, no external assets),
`GET /api/info` describes the model, `POST /api/generate` samples and returns PNG images as data URLs with the time
each stage took. The config (conf/app.yaml) has evaluate.py's generator, tokenizer and sampling keys, read by the
same loaders; each request's sampling settings go through the same validator as the command line's
(`check_sampling`), so a bad schedule is answered with HTTP 400 and the message evaluate.py would print.

The model is used by one request at a time (a lock): concurrent requests wait in turn instead of interleaving
batches and fighting over the CPU or GPU. The server binds 127.0.0.1 unless `host=` says otherwise and has no
authentication (docs/app.md).
"""

from __future__ import annotations

import base64
import http
import io
import json
import logging
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bar_lightning.config.schema import ConfigError, check_sampling, check_sampling_values
from bar_lightning.eval.evaluate import check_compatible, sampling_settings, to_uint8_nchw, uses_cuda_graph
from bar_lightning.eval.sampling import load_generator_from_source, load_tokenizer_from_source, resolve_device
from bar_lightning.models.bar import BARGenerator

log = logging.getLogger("bar_lightning.app")  # the same name when run as `python -m`

PAGE_RESOURCE = "app_page.html"
# A generation request is a few numbers: anything far larger is a mistake or abuse, refused before it is read.
MAX_REQUEST_BYTES = 64 * 1024
DEFAULT_NUM_IMAGES = 4
DEFAULT_GRID_STEPS = 5
REQUEST_KEYS = ("class_id", "num_images", "seed", "guidance_scale", "temperature", "tokens_allocation",
                "random_order", "guidance_grid")
GRID_KEYS = ("min", "max", "steps")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class RequestError(ValueError):
    """A request a client can fix: answered with HTTP 400 and this message (which names the value and the fix)."""


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: every value is in range for this generator."""

    class_id: int
    num_images: int
    seed: int
    sampling: DictConfig  # the sampling config of the first column (guidance_scale is replaced per column)
    allocation: list[int]
    guidance_scales: list[float]  # one column each; one value without a grid


class Sampler:
    """The loaded generator and tokenizer, the page's defaults, and the lock that serialises generations."""

    def __init__(self, generator: BARGenerator, tokenizer: torch.nn.Module, *, sampling: DictConfig,
                 device: torch.device, seed: int = 0, class_names: list[str] | None = None, max_images: int = 64,
                 max_grid_columns: int = 12, sources: dict[str, str] | None = None) -> None:
        check_compatible(generator, tokenizer)
        self.generator = generator.to(device).eval()
        self.tokenizer = tokenizer.to(device).eval()
        self.device = device
        self.sampling = sampling
        # The configured settings must themselves be valid, or the page would open on an error.
        self.default_allocation = check_sampling(sampling, generator.bits_per_step, generator.head_type)
        self.seed = seed
        self.class_names = class_names
        self.max_images = max_images
        self.max_grid_columns = max_grid_columns
        self.sources = sources or {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Sampler:
        """Load both networks the way evaluate.py does (vetted checkpoints, or released files with their yaml)."""
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
        device = resolve_device(cfg.device)
        generator = load_generator_from_source(cfg.generator)
        tokenizer = load_tokenizer_from_source(cfg.tokenizer, decode_only=True)
        names = resolve_class_names(cfg.class_names, cfg.generator, generator.num_classes)
        return cls(generator, tokenizer, sampling=cfg.sampling, device=device, seed=cfg.seed, class_names=names,
                   max_images=cfg.max_images, max_grid_columns=cfg.max_grid_columns,
                   sources={"generator": source_description(cfg.generator),
                            "tokenizer": source_description(cfg.tokenizer)})

    # ------------------------------------------------------------------------------------------------ the page
    def info(self) -> dict[str, Any]:
        """What the page needs to build its controls: classes, defaults, limits, and what is loaded."""
        guidance = float(self.sampling.guidance_scale)
        return {
            "num_classes": self.generator.num_classes,
            "class_names": self.class_names,
            "image_size": int(self.tokenizer.image_size),
            "bits_per_step": self.generator.bits_per_step,
            "head": self.generator.head_type,
            "device": str(self.device),
            "max_images": self.max_images,
            "max_grid_columns": self.max_grid_columns,
            "sources": self.sources,
            "defaults": {
                "class_id": 0, "num_images": min(DEFAULT_NUM_IMAGES, self.max_images), "seed": self.seed,
                "guidance_scale": guidance, "temperature": float(self.sampling.temperature),
                "tokens_allocation": list(self.default_allocation), "random_order": bool(self.sampling.random_order),
                # A range around the default that includes guidance off (1.0).
                "guidance_grid": {"min": 1.0, "max": max(2.0, round(2 * guidance - 1, 2)),
                                  "steps": min(DEFAULT_GRID_STEPS, self.max_grid_columns)},
            },
        }

    # ------------------------------------------------------------------------------------------------ requests
    def parse_request(self, payload: Any) -> GenerationRequest:
        """Check a request body; RequestError (or ConfigError from the shared validator) names what is wrong.

        Numbers may come as JSON numbers or as the text of the page's fields; the schedule as a list or as text
        such as "2,2,5,7". Omitted values take the page's defaults (the model's own settings).
        """
        if not isinstance(payload, dict):
            raise RequestError(f"the request body must be a JSON object with some of {list(REQUEST_KEYS)}")
        unknown = sorted(set(payload) - set(REQUEST_KEYS))
        if unknown:
            raise RequestError(f"unknown request key(s) {unknown}; accepted: {list(REQUEST_KEYS)}")
        num_classes = self.generator.num_classes
        class_id = integer(payload.get("class_id", 0), "class_id")
        if not 0 <= class_id < num_classes:
            raise RequestError(f"class_id={class_id} is not a class of this generator; use 0..{num_classes - 1}")
        num_images = integer(payload.get("num_images", DEFAULT_NUM_IMAGES), "num_images")
        if num_images < 1:
            raise RequestError(f"num_images={num_images} must be at least 1")
        seed = integer(payload.get("seed", self.seed), "seed")
        if not 0 <= seed < 2**63:
            raise RequestError(f"seed={seed} must be in 0..2^63-1")
        settings = {
            "guidance_scale": number(payload.get("guidance_scale", self.sampling.guidance_scale), "guidance_scale"),
            "temperature": number(payload.get("temperature", self.sampling.temperature), "temperature"),
            "tokens_allocation": allocation_list(payload.get("tokens_allocation",
                                                             list(self.sampling.tokens_allocation))),
            "random_order": boolean(payload.get("random_order", self.sampling.random_order), "random_order"),
        }
        sampling = OmegaConf.create({**OmegaConf.to_container(self.sampling, resolve=True), **settings})
        # The command line's check: guidance and temperature, then the schedule against this generator.
        allocation = check_sampling(sampling, self.generator.bits_per_step, self.generator.head_type)
        guidance_scales = [float(settings["guidance_scale"])]
        grid = payload.get("guidance_grid")
        if grid is not None:
            guidance_scales = self.grid_values(grid, sampling)
        total = num_images * len(guidance_scales)
        if total > self.max_images:
            raise RequestError(
                f"num_images={num_images} x {len(guidance_scales)} guidance columns = {total} images is over "
                f"max_images={self.max_images}; ask for fewer (or start the app with max_images={total})"
            )
        return GenerationRequest(class_id=class_id, num_images=num_images, seed=seed, sampling=sampling,
                                 allocation=allocation, guidance_scales=guidance_scales)

    def grid_values(self, grid: Any, sampling: DictConfig) -> list[float]:
        """`steps` guidance scales evenly spaced from `min` to `max`, each checked as sampling.guidance_scale."""
        if not isinstance(grid, dict) or set(grid) - set(GRID_KEYS) or not set(GRID_KEYS) <= set(grid):
            raise RequestError(f"guidance_grid={grid!r} must be an object with {list(GRID_KEYS)}, e.g. "
                               '{"min": 1, "max": 5, "steps": 5}')
        low, high = number(grid["min"], "guidance_grid.min"), number(grid["max"], "guidance_grid.max")
        steps = integer(grid["steps"], "guidance_grid.steps")
        if not 2 <= steps <= self.max_grid_columns:
            raise RequestError(f"guidance_grid.steps={steps} must be in 2..{self.max_grid_columns} (one column each; "
                               "max_grid_columns= raises the limit)")
        if high < low:
            raise RequestError(f"guidance_grid.max={high} is below guidance_grid.min={low}; swap them")
        values = [round(float(value), 6) for value in np.linspace(low, high, steps)]
        for value in (low, high):
            try:
                check_sampling_values(OmegaConf.merge(sampling, {"guidance_scale": value}))
            except ConfigError as error:
                raise RequestError(f"guidance_grid: {error}") from None
        return values

    # ------------------------------------------------------------------------------------------------ sampling
    def generate(self, request: GenerationRequest) -> dict[str, Any]:
        """Sample and decode every column of `request`, one request at a time; PNG data URLs and timings.

        Every column starts from the same seed, so the columns of a guidance grid differ by the guidance alone, and
        the same request gives the same images.
        """
        arrived = time.perf_counter()
        with self._lock:
            began = time.perf_counter()
            seconds = {"sampling": 0.0, "decoding": 0.0, "encoding_png": 0.0}
            labels = torch.full((request.num_images,), request.class_id, dtype=torch.long, device=self.device)
            columns = []
            # Grad mode is per thread: each server thread turns it off for its own work.
            with torch.inference_mode():
                for guidance in request.guidance_scales:
                    sampling = OmegaConf.merge(request.sampling, {"guidance_scale": guidance})
                    mark = time.perf_counter()
                    rng = torch.Generator(device=self.device).manual_seed(request.seed)
                    bits = self.generator.generate(labels, sampling_settings(sampling, request.allocation),
                                                   generator=rng, cuda_graph=uses_cuda_graph(sampling, self.device))
                    self._synchronize()
                    seconds["sampling"] += time.perf_counter() - mark
                    mark = time.perf_counter()
                    images = to_uint8_nchw(self.tokenizer.decode_bits(bits)).permute(0, 2, 3, 1).cpu().numpy()
                    seconds["decoding"] += time.perf_counter() - mark
                    mark = time.perf_counter()
                    columns.append({"guidance_scale": guidance, "images": [png_data_url(image) for image in images]})
                    seconds["encoding_png"] += time.perf_counter() - mark
            finished = time.perf_counter()
        count = request.num_images * len(columns)
        timings = {**{key: round(value, 4) for key, value in seconds.items()},
                   "waiting": round(began - arrived, 4), "generation": round(finished - began, 4)}
        log.info("class %d, %d image(s) in %d column(s), seed %d: %.2f s", request.class_id, count, len(columns),
                 request.seed, timings["generation"])
        return {
            "class_id": request.class_id,
            "class_name": self.class_names[request.class_id] if self.class_names else None,
            "num_images": request.num_images,
            "seed": request.seed,
            "image_size": int(self.tokenizer.image_size),
            "settings": {"guidance_scale": float(request.sampling.guidance_scale),
                         "temperature": float(request.sampling.temperature),
                         "tokens_allocation": list(request.allocation),
                         "random_order": bool(request.sampling.random_order)},
            "columns": columns,
            "timings_s": timings,
            "images_per_second": round(count / max(timings["generation"], 1e-9), 2),
            "device": str(self.device),
        }

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------------------------- values
def integer(value: Any, key: str) -> int:
    """An int from a JSON number or the text of a field; booleans and fractions are refused."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise RequestError(f"{key}={value!r} is not a whole number")


def number(value: Any, key: str) -> float:
    """A finite-or-not float from a JSON number or a field's text (range checks are the validator's)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise RequestError(f"{key}={value!r} is not a number")


def boolean(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise RequestError(f"{key}={value!r} must be true or false")


def allocation_list(value: Any) -> list[int | float]:
    """The schedule as a list: a JSON list, or text such as "2,2,5,7", "2 2 5 7" or "[2, 2, 5, 7]".

    Entries stay as given (a fraction stays a float) so that the shared validator reports them in its words.
    """
    entries = value
    if isinstance(value, str):
        entries = [entry for entry in re.split(r"[\s,]+", value.strip().strip("[]")) if entry]
    if not isinstance(entries, (list, tuple)):
        raise RequestError(f"tokens_allocation={value!r} must be a list of integers, e.g. 2,2,5,7")
    parsed: list[int | float] = []
    for entry in entries:
        try:
            amount = number(entry, "tokens_allocation") if not isinstance(entry, bool) else math.nan
        except RequestError:
            amount = math.nan
        if not math.isfinite(amount):
            raise RequestError(f"tokens_allocation={value!r} must be a list of integers, e.g. 2,2,5,7")
        parsed.append(int(amount) if amount.is_integer() else amount)
    return parsed


def png_data_url(image: np.ndarray) -> str:
    """`[H, W, 3]` uint8 -> a `data:image/png;base64,...` URL the page can show as it is."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------------- classes
def resolve_class_names(setting: Any, generator_source: DictConfig, num_classes: int) -> list[str] | None:
    """Class names in label order: `class_names` when given (a list or a file), else those of the data the
    generator was trained on when they can be found, else None (the page shows indices)."""
    if setting is not None:
        names = read_class_names(setting)
        if len(names) != num_classes:
            raise ConfigError(f"class_names has {len(names)} names but the generator has {num_classes} classes; give "
                              "one name per class, in label order")
        return names
    names, origin = training_class_names(generator_source)
    if names is not None and len(names) != num_classes:
        log.info("class names of %s: %d names for %d classes, not used", origin, len(names), num_classes)
        names = None
    if names is None:
        log.info("class names: none found for this generator; the page shows class indices (class_names=[...] or "
                 "class_names=<classes.json> names them)")
    else:
        log.info("class names from %s", origin)
    return names


def read_class_names(setting: Any) -> list[str]:
    """`class_names=`: a list, or a path to a classes.json (`{"classes": [...]}` or a list) or a text file with one
    name per line."""
    if not isinstance(setting, (str, Path)):
        return [str(name) for name in setting]
    path = Path(setting)
    if not path.is_file():
        raise FileNotFoundError(f"class_names={path} does not exist (a classes.json, or a text file with one name per "
                                "line)")
    if path.suffix == ".json":
        content = json.loads(path.read_text())
        names = content.get("classes") if isinstance(content, dict) else content
        if not isinstance(names, list):
            raise ConfigError(f"class_names={path} holds no list of names (expected {{\"classes\": [...]}} or a list)")
        return [str(name) for name in names]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def training_class_names(generator_source: DictConfig) -> tuple[list[str] | None, str]:
    """The class names of a checkpoint's training data: its token folder's metadata.json names the images the tokens
    came from, whose converter wrote classes.json beside the shards (or whose class folders are the names)."""
    if not generator_source.get("checkpoint"):
        return None, "released weights"
    from bar_lightning.lightning.checkpointing import read_module_checkpoint

    checkpoint = read_module_checkpoint(generator_source.checkpoint, expected="generator",
                                        key="generator.checkpoint", mmap=True)
    root = (checkpoint.get("datamodule_hyper_parameters") or {}).get("root")
    metadata_path = Path(root) / "metadata.json" if root else None
    if metadata_path is None or not metadata_path.is_file():
        return None, "the checkpoint's data"
    try:
        data = json.loads(metadata_path.read_text())["provenance"]["inputs"]["data"]
    except (KeyError, TypeError, ValueError):
        return None, str(metadata_path)
    if data.get("image_folder") and Path(data["image_folder"]).is_dir():
        folder = Path(data["image_folder"])
        names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        return names or None, f"the class folders of {folder}"
    shards = data.get("shards")
    if shards:
        shards_path = Path(str(shards).split("{")[0])
        folder = shards_path if shards_path.is_dir() else shards_path.parent
        classes_file = folder / "classes.json"
        if classes_file.is_file():
            return read_class_names(classes_file), str(classes_file)
    return None, str(metadata_path)


def source_description(source: DictConfig) -> str:
    if source.get("checkpoint"):
        return str(source.checkpoint)
    return f"{source.upstream_weights} ({source.upstream_config})"


# ---------------------------------------------------------------------------------------------------- server
class SamplerServer(ThreadingHTTPServer):
    """The HTTP server of one Sampler. Threads answer the page and `/api/info` while a generation runs."""

    daemon_threads = True  # a stuck client never keeps the process from exiting

    def __init__(self, address: tuple[str, int], sampler: Sampler) -> None:
        self.sampler = sampler
        self.page = resources.files("bar_lightning").joinpath(PAGE_RESOURCE).read_bytes()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, SamplerRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"

    @property
    def loopback_only(self) -> bool:
        return self.server_address[0] in ("127.0.0.1", "::1")


class SamplerRequestHandler(BaseHTTPRequestHandler):
    server: SamplerServer
    server_version = "bar-lightning-sampler"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(http.HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._send_json(http.HTTPStatus.OK, self.server.sampler.info())
        else:
            self._send_json(http.HTTPStatus.NOT_FOUND, {"error": f"{path} is not a page of this server; open / or "
                                                                 "POST /api/generate"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path != "/api/generate":
            self._send_json(http.HTTPStatus.NOT_FOUND, {"error": f"POST {path}: the API is POST /api/generate"})
            return
        # JSON only: a form or text/plain post from another site's page (sent without a CORS preflight) is refused.
        if self.headers.get_content_type() != "application/json":
            self._send_json(http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            {"error": "send the request as Content-Type: application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send_json(http.HTTPStatus.LENGTH_REQUIRED, {"error": "the request needs a Content-Length"})
            return
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self._send_json(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            {"error": f"a request body of {length} bytes is over {MAX_REQUEST_BYTES}"})
            return
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
        except (UnicodeDecodeError, ValueError) as error:
            self._send_json(http.HTTPStatus.BAD_REQUEST, {"error": f"the request body is not JSON ({error})"})
            return
        sampler = self.server.sampler
        try:
            request = sampler.parse_request(payload)
        except (RequestError, ConfigError) as error:
            self._send_json(http.HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        try:
            result = sampler.generate(request)
        except Exception as error:  # the server stays up for the next request; the traceback goes to the log
            log.exception("generation failed for %s", payload)
            self._send_json(http.HTTPStatus.INTERNAL_SERVER_ERROR,
                            {"error": f"generation failed: {type(error).__name__}: {error} (see the server log)"})
            return
        self._send_json(http.HTTPStatus.OK, result)

    def _host_allowed(self) -> bool:
        """On a loopback-only server, requests must name a loopback host: a page of another site that points its
        own domain name at 127.0.0.1 (DNS rebinding) cannot use the model."""
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
        if name in LOOPBACK_HOSTS:
            return True
        self._send_json(http.HTTPStatus.FORBIDDEN, {"error": f"Host {host!r} is not this machine's loopback name; "
                                                             f"open {self.server.url}"})
        return False

    def _send_json(self, status: http.HTTPStatus, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: http.HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if content_type.startswith("text/html"):
            # Everything is inline; nothing may be loaded from elsewhere.
            self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                             "style-src 'unsafe-inline'; img-src data:; connect-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


def make_server(sampler: Sampler, host: str = "127.0.0.1", port: int = 8000) -> SamplerServer:
    """Bind the server (port 0: any free port; `server.url` says which)."""
    try:
        server = SamplerServer((host, port), sampler)
    except OSError as error:
        raise ConfigError(f"cannot listen on host={host} port={port} ({error.strerror or error}): choose another "
                          "port=<n>, or port=0 for any free one") from None
    if not server.loopback_only:
        log.warning("host=%s: every machine that reaches this one can use the model, without authentication "
                    "(docs/app.md)", host)
    return server


def run_app(cfg: DictConfig) -> None:
    """Load the models of `cfg` (validated) and serve the page until Ctrl-C."""
    sampler = Sampler.from_config(cfg)
    server = make_server(sampler, cfg.host, cfg.port)
    # One line with the URL on stdout, whatever the logging setup, for a person or a script to pick up.
    print(f"Sampler page: {server.url} (Ctrl-C stops it)", flush=True)
    log.info("Sampler page: %s", server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()


def _app_task(cfg: DictConfig) -> None:
    from bar_lightning.config.derive import command_line_overrides, derive_evaluation_sampling
    from bar_lightning.config.printing import print_config_tree
    from bar_lightning.config.schema import validate_app_config

    # As evaluate.py: the generator's own sampling settings unless the command line chooses them.
    cfg = derive_evaluation_sampling(validate_app_config(cfg), command_line_overrides())
    if cfg.print_config:
        print_config_tree(cfg)
    run_app(cfg)


def main() -> None:
    import hydra

    from bar_lightning.cli import check_overrides, report_user_errors
    from bar_lightning.paths import config_dir

    check_overrides("app")
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="app")(report_user_errors(_app_task))()


if __name__ == "__main__":
    main()
