"""Fetch and verify the released BAR weights and every pretrained network the configs read, in one command.

    python -m bar_lightning.weights list
    python -m bar_lightning.weights fetch bar_b_patch4 bar_fsq_16bits inception
    python -m bar_lightning.weights verify

Training and evaluation never download anything: they read files under `paths.pretrained_dir`
(`$BAR_ROOT/pretrained`, else `<clone>/pretrained`) and stop with a clear error when one is missing. This command is
the one place that downloads, so what lands there is always checked the same way:

* what to fetch comes from a manifest shipped with the package (`weights_manifest.json`): per name, the files, their
  destination under the pretrained folder (the exact name the configs expect), where they come from (a Hugging Face
  repo file or a plain URL) and, where genuinely known, their size and SHA-256 (or the SHA-256 prefix torchvision
  puts in its file names);
* Hugging Face files resolve through `huggingface_hub` (so `HF_ENDPOINT` and a stored token are honoured) and the
  hub reports the SHA-256 of large files, which is checked too; the bytes themselves are streamed by the same code
  as plain URLs, so resume, progress and hashing behave the same for both;
* a download streams into `<dest>.part`, resumes with an HTTP `Range` request after an interruption, is checked
  (size, hash) and only then renamed into place: a file at its final path is always complete and checked;
* each installed file is recorded in `weights.lock.json` beside it (size, SHA-256, source, date), so a file without a
  pinned hash is still checked against what was first downloaded (trust on first download), and `verify` refuses a
  file that changed since.

`--offline` (or `HF_HUB_OFFLINE=1`) makes no network request at all: it checks what is there and lists what is missing
with the address to get each file from by hand.

The package: `manifest` (what to fetch, and from where), `download` (lock file, hashing, streaming with resume),
`hints` (the fetch command named by "file missing" errors) and `cli` (the commands, `python -m` runs `__main__`).
Everything is re-exported here, so `from bar_lightning.weights import fetch_hint` and `weights.main` keep working.
"""

from __future__ import annotations

from bar_lightning.weights.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    FETCH_LOCK_NAME,
    PARTIAL_SUFFIX,
    Report,
    build_parser,
    check_present_file,
    fetch_file,
    list_entries,
    main,
    offline_requested,
    one_fetch_at_a_time,
    verify,
)
from bar_lightning.weights.download import (
    CHUNK_BYTES,
    HTTP_TIMEOUT_S,
    LOCK_FILE_NAME,
    ByteProgress,
    Expectation,
    Resolved,
    manifest_expectation,
    read_lock,
    record_in_lock,
    refusal,
    resolve_source,
    sha256_of,
    stream_to_partial,
)
from bar_lightning.weights.hints import (
    fetch_hint,
)
from bar_lightning.weights.manifest import (
    COMMAND,
    MANIFEST_VARIABLE,
    Entry,
    Manifest,
    ManifestError,
    Source,
    UnknownNameError,
    WeightFile,
    WeightsError,
    default_pretrained_dir,
    load_manifest,
    manifest_location,
    parse_manifest,
)

__all__ = [
    "ByteProgress",
    "CHUNK_BYTES",
    "COMMAND",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Entry",
    "Expectation",
    "FETCH_LOCK_NAME",
    "HTTP_TIMEOUT_S",
    "LOCK_FILE_NAME",
    "MANIFEST_VARIABLE",
    "Manifest",
    "ManifestError",
    "PARTIAL_SUFFIX",
    "Report",
    "Resolved",
    "Source",
    "UnknownNameError",
    "WeightFile",
    "WeightsError",
    "build_parser",
    "check_present_file",
    "default_pretrained_dir",
    "fetch_file",
    "fetch_hint",
    "list_entries",
    "load_manifest",
    "main",
    "manifest_expectation",
    "manifest_location",
    "offline_requested",
    "one_fetch_at_a_time",
    "parse_manifest",
    "read_lock",
    "record_in_lock",
    "refusal",
    "resolve_source",
    "sha256_of",
    "stream_to_partial",
    "verify",
]
