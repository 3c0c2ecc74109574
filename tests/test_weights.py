"""`python -m bar_lightning.weights` against a local HTTP server that plays both a plain file host and the Hugging Face
hub (resolve URLs answered with the hub's headers and a redirect to a "CDN" on another host name), with a test
manifest: downloads, resume after a cut connection, refused hashes, 404 and unreachable hosts, offline mode, tampered
files, unknown names; plus the real manifest against the configs and the fetch hints of the missing-file errors.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bar_lightning import weights
from bar_lightning.paths import code_root

PLAIN = bytes(range(256)) * 256  # 64 KiB
HUB = hashlib.sha256(b"hub").digest() * 3000  # 96000 bytes
OTHER = b"not the pinned content" * 100
REPO, HUB_FILENAME, COMMIT = "org/repo", "weights/model.bin", "a" * 40


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHost(ThreadingHTTPServer):
    """Files by URL path, hub files by (repo, filename), a log of (method, path, Range header) and fault switches."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHostHandler)
        self.files: dict[str, bytes] = {}
        self.hub: dict[tuple[str, str], bytes] = {}
        self.hub_reported_sha256: dict[tuple[str, str], str] = {}
        self.cut_next_get: set[str] = set()  # send half of the body, then close the connection
        self.ignore_range: set[str] = set()  # answer 200 with the whole file even to a Range request
        self.log: list[tuple[str, str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHostHandler(BaseHTTPRequestHandler):
    server: FakeHost

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        self.server.log.append((self.command, path, self.headers.get("Range")))
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if resolve:
            self._answer_hub(resolve.group(1), resolve.group(3))
        elif path.startswith("/cdn/"):
            repo_and_file = path.removeprefix("/cdn/")
            repo, filename = "/".join(repo_and_file.split("/")[:2]), "/".join(repo_and_file.split("/")[2:])
            self._send_bytes(path, self.server.hub[(repo, filename)])
        elif path in self.server.files:
            self._send_bytes(path, self.server.files[path])
        else:
            self.send_error(404, "Not Found")

    def _answer_hub(self, repo: str, filename: str) -> None:
        # What huggingface_hub's HEAD on a resolve URL gets for an LFS file: a redirect to the CDN, carrying the
        # commit, the file's SHA-256 (X-Linked-Etag) and size. The CDN is "localhost" so the client does not follow.
        key = (repo, filename)
        if key not in self.server.hub:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.server.hub[key]
        self.send_response(302)
        self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cdn/{repo}/{filename}")
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Linked-Etag", f'"{self.server.hub_reported_sha256.get(key, sha256(data))}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef01234567"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_bytes(self, key: str, data: bytes) -> None:
        requested = self.headers.get("Range")
        start = 0
        if requested and key not in self.server.ignore_range:
            start = int(re.match(r"^bytes=(\d+)-$", requested).group(1))
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if key in self.server.cut_next_get:
            self.server.cut_next_get.discard(key)
            body = body[: len(body) // 2]
        self.wfile.write(body)
        self.wfile.flush()


@pytest.fixture
def host(monkeypatch):
    server = FakeHost()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "")
    yield server
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def manifest(host, tmp_path, monkeypatch):
    host.files["/files/plain.bin"] = PLAIN
    host.files["/files/tofu.bin"] = OTHER
    host.files["/files/bad.bin"] = OTHER
    host.hub[(REPO, HUB_FILENAME)] = HUB
    host.hub[(REPO, "weights/liar.bin")] = HUB
    host.hub_reported_sha256[(REPO, "weights/liar.bin")] = sha256(b"something else")
    data = {
        "format": 1,
        "entries": [
            {"name": "plain", "description": "pinned plain URL",
             "files": [{"path": "plain.bin", "source": {"url": f"{host.url}/files/plain.bin"},
                        "size": len(PLAIN), "sha256": sha256(PLAIN)}]},
            {"name": "tofu", "description": "plain URL, no hash",
             "files": [{"path": "sub/tofu.bin", "source": {"url": f"{host.url}/files/tofu.bin"}}]},
            {"name": "hubfile", "aliases": ["hub_alias"], "description": "hub file, hash reported by the hub",
             "files": [{"path": "hub/model.bin",
                        "source": {"hf_repo": REPO, "hf_filename": HUB_FILENAME, "revision": "main"}}]},
            {"name": "hubliar", "description": "hub reports a hash the bytes do not have",
             "files": [{"path": "liar.bin",
                        "source": {"hf_repo": REPO, "hf_filename": "weights/liar.bin", "revision": "main"}}]},
            {"name": "badhash", "description": "pinned hash the server's bytes do not have",
             "files": [{"path": "bad.bin", "source": {"url": f"{host.url}/files/bad.bin"},
                        "sha256": sha256(PLAIN)}]},
            {"name": "gone", "description": "404",
             "files": [{"path": "gone.bin", "source": {"url": f"{host.url}/files/gone.bin"}}]},
            {"name": "unreachable", "description": "nothing listens there",
             "files": [{"path": "far.bin", "source": {"url": f"http://127.0.0.1:{_closed_port()}/far.bin"}}]},
            {"name": "mirrored", "description": "official home 404s, the hub mirror has it",
             "files": [{"path": "mirrored.bin", "source": {"url": f"{host.url}/files/moved.bin"},
                        "mirrors": [{"hf_repo": REPO, "hf_filename": HUB_FILENAME}], "sha256": sha256(HUB)}]},
        ],
        "groups": {"both": ["plain", "hubfile"]},
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(weights.MANIFEST_VARIABLE, str(path))
    return data


@pytest.fixture
def folder(tmp_path) -> Path:
    return tmp_path / "pretrained"


def run(folder: Path, *arguments: str) -> int:
    return weights.main(["--dir", str(folder), *arguments])


def lock_of(folder: Path) -> dict:
    return json.loads((folder / weights.LOCK_FILE_NAME).read_text())["files"]


def gets(host: FakeHost) -> list[tuple[str, str, str | None]]:
    return [entry for entry in host.log if entry[0] == "GET"]


def test_fetch_plain_and_hub_files_installs_bytes_and_lock(manifest, host, folder, capsys):
    assert run(folder, "fetch", "both", "tofu") == 0
    assert (folder / "plain.bin").read_bytes() == PLAIN
    assert (folder / "hub/model.bin").read_bytes() == HUB
    assert (folder / "sub/tofu.bin").read_bytes() == OTHER
    assert not list(folder.rglob("*.part"))
    lock = lock_of(folder)
    assert lock["plain.bin"]["sha256"] == sha256(PLAIN) and lock["plain.bin"]["size"] == len(PLAIN)
    assert lock["plain.bin"]["source"] == f"{host.url}/files/plain.bin"
    assert lock["hub/model.bin"]["sha256"] == sha256(HUB)
    assert lock["hub/model.bin"]["source"] == f"hf://{REPO}/{HUB_FILENAME}@main"
    assert lock["hub/model.bin"]["commit"] == COMMIT
    assert lock["hub/model.bin"]["checked_against"] == "reported by the hub"
    assert lock["sub/tofu.bin"]["checked_against"] == "nothing (first download)"
    # The hub path went through huggingface_hub's HEAD on the resolve URL, the bytes through the CDN URL.
    assert ("HEAD", f"/{REPO}/resolve/main/{HUB_FILENAME}", None) in host.log
    assert ("GET", f"/cdn/{REPO}/{HUB_FILENAME}", None) in host.log
    output = capsys.readouterr().out
    assert "fetched plain.bin" in output and "checked against the manifest" in output

    # Fetching again downloads nothing and verifies what is there.
    requests_before = len(host.log)
    assert run(folder, "fetch", "plain", "hub_alias") == 0
    assert len(host.log) == requests_before
    assert run(folder, "verify") == 0


def test_resume_after_cut_connection_sends_range(manifest, host, folder, capsys):
    host.cut_next_get.add("/files/plain.bin")
    assert run(folder, "fetch", "plain") == 1
    partial = folder / "plain.bin.part"
    half = len(PLAIN) // 2
    assert partial.stat().st_size == half and not (folder / "plain.bin").exists()
    error = capsys.readouterr().err
    assert f"closed after {half} of {len(PLAIN)} bytes" in error and "resume" in error

    assert run(folder, "fetch", "plain") == 0
    assert gets(host)[-1] == ("GET", "/files/plain.bin", f"bytes={half}-")
    assert (folder / "plain.bin").read_bytes() == PLAIN
    assert not partial.exists()


def test_resume_of_a_hub_file_and_a_server_that_ignores_range(manifest, host, folder):
    key = f"/cdn/{REPO}/{HUB_FILENAME}"
    host.cut_next_get.add(key)
    assert run(folder, "fetch", "hubfile") == 1
    host.ignore_range.add(key)  # the retry's Range request is answered with the whole file: restart, not append
    assert run(folder, "fetch", "hubfile") == 0
    assert gets(host)[-1] == ("GET", key, f"bytes={len(HUB) // 2}-")
    assert (folder / "hub/model.bin").read_bytes() == HUB


def test_hash_mismatch_is_refused_and_nothing_installed(manifest, host, folder, capsys):
    assert run(folder, "fetch", "badhash") == 1
    assert not (folder / "bad.bin").exists() and not (folder / "bad.bin.part").exists()
    assert "bad.bin" not in (lock_of(folder) if (folder / weights.LOCK_FILE_NAME).exists() else {})
    error = capsys.readouterr().err
    assert "REFUSED bad.bin" in error
    assert f"sha256 {sha256(OTHER)}, expected {sha256(PLAIN)} (manifest)" in error
    assert "nothing was installed" in error

    # The hub's own SHA-256 is checked as well.
    assert run(folder, "fetch", "hubliar") == 1
    assert not (folder / "liar.bin").exists()
    error = capsys.readouterr().err
    assert f"expected {sha256(b'something else')} (reported by the hub)" in error


def test_404_and_unreachable_name_file_url_and_the_manual_alternative(manifest, host, folder, capsys):
    assert run(folder, "fetch", "gone") == 1
    error = capsys.readouterr().err
    assert "FAILED  gone.bin (gone)" in error and f"{host.url}/files/gone.bin: HTTP 404" in error
    assert f"copy it to exactly {folder / 'gone.bin'}" in error

    url = manifest["entries"][6]["files"][0]["source"]["url"]
    assert run(folder, "fetch", "unreachable") == 1
    error = capsys.readouterr().err
    assert f"{url}: cannot connect" in error and f"copy it to exactly {folder / 'far.bin'}" in error


def test_a_mirror_is_tried_when_the_official_home_fails(manifest, host, folder, capsys):
    assert run(folder, "fetch", "mirrored") == 0
    assert (folder / "mirrored.bin").read_bytes() == HUB
    assert lock_of(folder)["mirrored.bin"]["source"] == f"hf://{REPO}/{HUB_FILENAME}@main"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_offline_makes_no_request_and_lists_what_is_missing(manifest, host, folder, capsys, monkeypatch, how):
    (folder / "sub").mkdir(parents=True)
    (folder / "sub/tofu.bin").write_bytes(OTHER)  # copied by hand
    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run(folder, "fetch", *(["--offline"] if how == "flag" else []), "plain", "hubfile", "tofu") == 1
    assert host.log == []
    captured = capsys.readouterr()
    assert f"MISSING plain.bin (plain; offline: not downloaded): get it from {host.url}/files/plain.bin" in captured.err
    assert f"{host.url}/{REPO}/resolve/main/{HUB_FILENAME}" in captured.err
    assert f"copy it to exactly {folder / 'hub/model.bin'}" in captured.err
    # The hand-copied file without a known hash is recorded (trust on first use).
    assert "ok      sub/tofu.bin" in captured.out and lock_of(folder)["sub/tofu.bin"]["sha256"] == sha256(OTHER)


def test_verify_detects_a_tampered_file(manifest, host, folder, capsys):
    assert run(folder, "fetch", "plain", "tofu") == 0
    (folder / "plain.bin").write_bytes(PLAIN[:-1] + b"x")
    (folder / "sub/tofu.bin").write_bytes(OTHER + b"!")
    capsys.readouterr()
    assert run(folder, "verify") == 1
    error = capsys.readouterr().err
    tampered = sha256(PLAIN[:-1] + b"x")
    assert f"REFUSED {folder / 'plain.bin'}: sha256 {tampered}, expected {sha256(PLAIN)} (manifest)" in error
    assert f"rm '{folder / 'plain.bin'}' && python -m bar_lightning.weights fetch plain" in error
    # Without a pinned hash the lock's record is the reference.
    assert f"REFUSED {folder / 'sub/tofu.bin'}: size {len(OTHER) + 1} bytes, expected {len(OTHER)} bytes" in error
    assert weights.LOCK_FILE_NAME in error
    # fetch does not overwrite a refused file either.
    assert run(folder, "fetch", "plain") == 1 and (folder / "plain.bin").read_bytes() == PLAIN[:-1] + b"x"


def test_verify_with_names_fails_on_missing_files(manifest, host, folder, capsys):
    assert run(folder, "verify") == 0  # nothing fetched yet: reported, not a failure
    assert "missing plain.bin (plain)" in capsys.readouterr().out
    assert run(folder, "verify", "plain") == 1
    assert host.log == []


def test_unknown_name_lists_valid_names(manifest, folder, capsys):
    assert run(folder, "fetch", "plain", "vgg17") == 2
    error = capsys.readouterr().err
    assert "unknown weights name(s) 'vgg17'" in error
    assert "Valid names: plain, tofu, hubfile" in error and "groups: all, both" in error and "hub_alias" in error
    assert not folder.exists() or not any(folder.iterdir())


def test_list_shows_entries_files_and_state(manifest, folder, capsys):
    assert run(folder, "list") == 0
    output = capsys.readouterr().out
    assert f"pretrained folder: {folder.resolve()}" in output
    assert "missing plain.bin" in output and "pinned sha256" in output
    assert "hub-reported sha256, then lock" in output and "trust on first download (lock)" in output


# ---------------------------------------------------------------------------------------------------------------
# The real manifest and the missing-file errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def real_manifest(monkeypatch) -> weights.Manifest:
    monkeypatch.delenv(weights.MANIFEST_VARIABLE, raising=False)
    return weights.load_manifest()


def test_real_manifest_provides_every_configured_pretrained_file(real_manifest):
    provided = {file.path for entry in real_manifest.entries.values() for file in entry.files}
    configured = set()
    for config in (code_root() / "conf").rglob("*.yaml"):
        configured |= set(re.findall(r"\$\{paths\.pretrained_dir\}/([^\s'\"}]+)", config.read_text()))
    assert configured, "the configs no longer read anything from paths.pretrained_dir?"
    assert configured <= provided, f"no manifest entry provides {sorted(configured - provided)}"


def test_real_manifest_is_well_formed(real_manifest):
    raw = json.loads((code_root() / "src/bar_lightning/weights_manifest.json").read_text())
    names = [entry["name"] for entry in raw["entries"]]
    labels = names + [alias for entry in raw["entries"] for alias in entry.get("aliases", [])] + list(raw["groups"])
    assert len(labels) == len(set(labels))
    for entry in raw["entries"]:
        for file in entry["files"]:
            assert "sha256" not in file or re.fullmatch(r"[0-9a-f]{64}", file["sha256"])
            assert "sha256_prefix" not in file or file["path"].split("-")[-1].startswith(file["sha256_prefix"])
    # The files the brief of issue 17 names, under the names the configs and upstream use.
    assert {"bar_b_patch4", "bar_b_patch2", "bar_b", "bar_l", "bar_l_res512", "bar_fsq_16bits",
            "bar_fsq_16bits_ft", "bar_fsq_10bits_res512", "vgg16", "lpips", "convnext_small", "dino", "siglip2",
            "inception"} <= set(names)
    hf_files = {file.sources[0].hf_filename for entry in real_manifest.entries.values() for file in entry.files
                if file.sources[0].is_hf}
    assert {"generator/bar_b.bin", "tokenizer/bar_sfq_10bits_res512.bin", "models/dino_vit_small_patch8_224.pth",
            "model.safetensors"} <= hf_files


def test_default_folder_is_the_configs_pretrained_dir(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    monkeypatch.setenv("BAR_ROOT", str(tmp_path))
    paths = OmegaConf.create({"paths": OmegaConf.load(code_root() / "conf/paths/default.yaml")})
    assert Path(paths.paths.pretrained_dir) == weights.default_pretrained_dir() == tmp_path / "pretrained"


def test_missing_file_errors_name_the_fetch_command(real_manifest, tmp_path, monkeypatch):
    from bar_lightning.eval.metrics import INCEPTION_WEIGHTS_HINT, check_weights_file
    from bar_lightning.models.losses import LOSS_OFF
    from bar_lightning.models.pretrained import VGG16_WEIGHTS_DESCRIPTION, require_weights

    monkeypatch.setenv("BAR_ROOT", str(tmp_path))
    default = tmp_path / "pretrained"
    with pytest.raises(FileNotFoundError, match=r"not found at .*weight to 0.*Fetch it with: python -m "
                                                r"bar_lightning\.weights fetch vgg16$"):
        require_weights(default / "vgg16-397923af.pth", what=VGG16_WEIGHTS_DESCRIPTION, needed_by="the Gram loss",
                        how_to_disable=LOSS_OFF)
    with pytest.raises(FileNotFoundError, match=r"No path was given.*fetch vgg16$"):
        require_weights(None, what=VGG16_WEIGHTS_DESCRIPTION, needed_by="the Gram loss")
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match=rf"fetch dino --dir {re.escape(str(elsewhere))}$"):
        require_weights(elsewhere / "dino_vit_small_patch8_224.pth", what="DINO", needed_by="the discriminator")
    with pytest.raises(FileNotFoundError, match=r"fetch inception$"):
        check_weights_file(default / "weights-inception-2015-12-05-6726825d.pth", what=INCEPTION_WEIGHTS_HINT,
                           needed_by="FID")
    with pytest.raises(FileNotFoundError, match=r"fetch inception$"):
        check_weights_file(None, what=INCEPTION_WEIGHTS_HINT, needed_by="FID")
    # The released generators' files, read through the official-checkpoint loaders.
    from bar_lightning.compat.files import load_state_dict_file, load_yaml_config

    with pytest.raises(FileNotFoundError, match=r"generator\.upstream_config=.*fetch bar_b$"):
        load_yaml_config(default / "configs/generator/bar_b.yaml", key="generator.upstream_config")
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*fetch bar_l$"):
        load_state_dict_file(default / "generator/bar_l.bin")
    # A file no entry provides gets no hint (rather than a wrong one).
    with pytest.raises(FileNotFoundError) as error:
        require_weights(tmp_path / "my_vgg.pth", what="VGG", needed_by="the Gram loss")
    assert "Fetch it with" not in str(error.value)


def test_module_runs_as_a_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bar_lightning.weights", "--dir", str(tmp_path), "list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bar_fsq_16bits_ft" in result.stdout and "vgg16-397923af.pth" in result.stdout


def test_a_second_fetch_in_the_same_folder_is_refused(manifest, host, folder, capsys):
    import fcntl

    folder.mkdir(parents=True)
    with (folder / weights.FETCH_LOCK_NAME).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run(folder, "fetch", "plain") == 1
    assert "another `python -m bar_lightning.weights fetch` is running" in capsys.readouterr().err
    assert host.log == []
    assert run(folder, "fetch", "plain") == 0


def test_a_hand_copied_hub_file_is_checked_against_the_hub_when_online(manifest, host, folder, capsys):
    (folder / "hub").mkdir(parents=True)
    (folder / "hub/model.bin").write_bytes(HUB[:-1] + b"x")  # a bad copy of the right size
    assert run(folder, "fetch", "hubfile") == 1
    assert f"expected {sha256(HUB)} (reported by the hub)" in capsys.readouterr().err
    (folder / "hub/model.bin").write_bytes(HUB)
    assert run(folder, "fetch", "hubfile") == 0
    assert "matches the sha256 reported by the hub" in capsys.readouterr().out
    assert lock_of(folder)["hub/model.bin"]["sha256"] == sha256(HUB)
    assert not [entry for entry in host.log if entry[1].startswith("/cdn/")]  # checked, not downloaded
