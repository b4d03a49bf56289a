"""Named JSON configs: a built-in that a package ships in a folder, or a JSON file by path.

Cost profiles (``llmsched_env/profiles``) and live-engine configs (``live_backend/configs``) are
both looked up this way, with the same errors: an unknown name lists the built-ins, and a malformed
file names its line.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from llmsched_env.errors import ConfigError


def builtin_names(package: str, folder: str) -> list[str]:
    """Names (without ``.json``) of the configs ``package`` ships in ``folder``."""
    entries = (resources.files(package) / folder).iterdir()
    return sorted(entry.name.removesuffix(".json") for entry in entries if entry.name.endswith(".json"))


def read_json_config(name_or_path: str | Path, package: str, folder: str, kind: str) -> tuple[str, object]:
    """``(source, data)``: the built-in ``name_or_path`` of ``package/folder``, else the JSON file at that path.

    ``source`` names where the data came from, for error messages (``"profile 'x'"`` or the file's path).
    """
    text_name = str(name_or_path)
    builtins = builtin_names(package, folder)
    if text_name in builtins:
        source = f"{kind} {text_name!r}"
        raw = (resources.files(package) / folder / f"{text_name}.json").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"no {kind} {text_name!r}: neither a built-in ({', '.join(builtins)}) nor a JSON file")
        source, raw = str(path), path.read_text()
    try:
        return source, json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}:{error.lineno}: invalid JSON: {error.msg}") from None
