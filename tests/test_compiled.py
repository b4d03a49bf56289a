"""Each environment keeps its own compiled-kernel cache (llmsched_env.compiled)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

from llmsched_env import compiled

ROOT = Path(__file__).resolve().parents[1]


def test_the_cache_key_names_every_version_that_changes_the_machine_code(monkeypatch: pytest.MonkeyPatch) -> None:
    key = compiled.cache_key()
    assert f"numba{numba.__version__}" in key and f"{sys.version_info[0]}.{sys.version_info[1]}-numba" in key
    monkeypatch.setattr(numba, "__version__", "0.0.1")  # another environment's Numba
    assert compiled.cache_key() != key
    monkeypatch.setattr(numba, "__version__", key.split("numba")[1].split("-")[0])
    monkeypatch.setattr(sys, "prefix", "/another/venv")  # another environment with the same versions
    assert compiled.cache_key() != key


def test_the_cache_key_changes_with_any_source_of_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numba checks a cached function against its own file only: a caller compiled against an older callee of
    another module would keep the old callee's code. A change to any source of the packages with compiled
    functions (the simulator's, and the policies' compiled rules) gives a new cache folder."""
    for name in ("llmsched_env/kernels.py", "llmsched_env/episode.py", "baselines/fcfs.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    monkeypatch.setattr(compiled, "__file__", str(tmp_path / "llmsched_env" / "compiled.py"))
    before = compiled.sources_hash()
    assert compiled.sources_hash() == before
    (tmp_path / "llmsched_env" / "kernels.py").write_text("x = 2\n")  # a callee changes, its caller's file does not
    changed = compiled.sources_hash()
    assert changed != before
    (tmp_path / "baselines" / "fcfs.py").write_text("x = 2\n")  # a policy's rule changes, the loop's file does not
    assert compiled.sources_hash() != changed


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="nothing is compiled or cached")
def test_kernels_cache_into_the_environments_folder_and_honour_numba_cache_dir(tmp_path: Path) -> None:
    script = ("import numpy as np; from llmsched_env import kernels; from llmsched_env.compiled import cache_dir; "
              "kernels.blocks_to_grow(np.arange(3), np.array([16, 5, 32]), 16); print(cache_dir())")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("NUMBA_CACHE_DIR", None)
    folder = Path(subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, text=True,
                                 capture_output=True).stdout.strip())
    assert folder.parent == tmp_path / "xdg" / "llmsched" / "numba" and folder.name == compiled.cache_key()
    assert any(folder.rglob("*kernels.blocks_to_grow*.nbi")), sorted(folder.rglob("*"))

    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, capture_output=True)
    assert any((tmp_path / "numba").rglob("*kernels.blocks_to_grow*.nbi"))


def test_other_numba_functions_keep_numbas_own_cache_folder() -> None:
    from numba.core import config

    before = config.CACHE_DIR

    @compiled.compiled
    def twice(x: int) -> int:
        return 2 * x

    assert config.CACHE_DIR == before and twice(4) == 8
