"""The sentence the "file missing" errors of training and evaluation end with: which fetch command provides the file.

Imported lazily by models/, eval/ and compat/ while they report a missing file, so it stays cheap: it needs only the
manifest code and the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path

from bar_lightning.weights.manifest import COMMAND, default_pretrained_dir, load_manifest


# ---------------------------------------------------------------------------------------------------------------
# Hints for the "file missing" errors of training and evaluation
# ---------------------------------------------------------------------------------------------------------------
def fetch_hint(path: str | os.PathLike[str] | None, *, mentioned: str = "") -> str:
    """A sentence naming the fetch command for a missing file, or "" when no manifest entry provides it.

    The entry is found by the configured path (its tail under the pretrained folder, or its base name) or, when no
    path was configured, by a manifest file name that `mentioned` (the error's description of the file) contains.
    `--dir` is added when the configured path is not under the default pretrained folder. This runs while another
    error is being reported, so it never raises.
    """
    try:
        manifest = load_manifest()
        if path is not None and str(path):
            configured = Path(path).expanduser()
            for entry in manifest.entries.values():
                for file in entry.files:
                    if configured.as_posix().endswith("/" + file.path) or configured.as_posix() == file.path:
                        folder = Path(configured.as_posix()[: -len(file.path)] or ".")
                        return _hint_sentence(entry.name, folder)
            entries = manifest.entries_providing(configured.name)
            if entries:
                placed = default_pretrained_dir() / entries[0].files[0].path
                return (f" Fetch it with: {COMMAND} fetch {entries[0].name} (it writes {placed}; point the config "
                        "there or copy the file to the path above).")
            return ""
        for entry in manifest.entries.values():
            if any(Path(file.path).name in mentioned for file in entry.files):
                return _hint_sentence(entry.name, default_pretrained_dir())
    except Exception:  # a hint must never hide the error it decorates
        return ""
    return ""


def _hint_sentence(name: str, folder: Path) -> str:
    try:
        same = folder.resolve() == default_pretrained_dir().resolve()
    except OSError:
        same = False
    where = "" if same else f" --dir {folder}"
    return f" Fetch it with: {COMMAND} fetch {name}{where}"
