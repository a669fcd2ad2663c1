"""Run Python code in a fresh interpreter that cannot import this package: only a saved folder's own code can answer.

The package is installed (editable), so leaving it off `sys.path` is not enough: an import hook refuses
`modeling_whisper_moe` and `processing`. The script fills a dict named `result`; it comes back as JSON together with
the names of any package modules that leaked into `sys.modules` (`result["leaked"]`, empty when the folder is
self-contained). Used by the tests (`conftest.run_without_package`) and by the evaluators that measure saved folders
(`processing.evaluation`, through `run_self_contained`).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCKED_PACKAGES = ("modeling_whisper_moe", "processing")
RESULT_MARKER = "RESULT"
DEFAULT_TIMEOUT_S = 900

_PREAMBLE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in __BLOCKED__:
                raise ImportError(f"{name} must not be importable in this test")

    sys.meta_path.insert(0, BlockPackage())
    sys.path = [p for p in sys.path if p not in ("", __REPO__)]
    """
)
_EPILOGUE = """
result["leaked"] = [name for name in sys.modules if name.split(".")[0] in __BLOCKED__]
print(__MARKER__ + json.dumps(result))
"""


def blocking_preamble() -> str:
    """Code that, run first in an interpreter, makes this package unimportable."""
    return _substitute(_PREAMBLE)


def isolated_code(script: str) -> str:
    """`script` wrapped in the import block and the epilogue that prints its `result` dict."""
    return _substitute(_PREAMBLE + script + _EPILOGUE)


def _substitute(code: str) -> str:
    values = {"__REPO__": str(REPO_ROOT), "__BLOCKED__": BLOCKED_PACKAGES, "__MARKER__": RESULT_MARKER}
    for name, value in values.items():
        code = code.replace(name, repr(value))
    return code


def run_isolated(
    script: str, *args: object, cwd: str | os.PathLike, timeout: float | None = DEFAULT_TIMEOUT_S
) -> dict:
    """Run `script` (which fills a dict named `result`) offline in a fresh interpreter without this package.

    `args` become `sys.argv[1:]`; remote code is cached under `cwd/modules`. Raises `RuntimeError` with the end of the
    child's stderr when it fails.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(cwd) / "modules")}
    proc = subprocess.run(
        [sys.executable, "-c", isolated_code(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"isolated script failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next((line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)), None)
    if line is None:
        raise RuntimeError(f"isolated script printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[len(RESULT_MARKER) :])


def run_self_contained(
    script: str, folder: str | os.PathLike, *args: object, cwd: str | os.PathLike, timeout: float | None
) -> dict:
    """`run_isolated(script, folder, *args)` for code that loads the saved `folder`; the result without `leaked`.

    Raises `RuntimeError` naming the folder when its code imported this package instead of its own files.
    """
    result = run_isolated(script, folder, *args, cwd=cwd, timeout=timeout)
    leaked = result.pop("leaked")
    if leaked:
        raise RuntimeError(f"{folder} imported this package instead of its own code: {leaked}")
    return result
