"""unsloth is imported before transformers, peft and trl when a run may use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FAKE_UNSLOTH = """
import sys
IMPORTED_BEFORE = [name for name in ("transformers", "peft", "trl") if name in sys.modules]
"""


def run(code: str, path: Path | None = None) -> str:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_command_line_imports_no_library_unsloth_patches():
    code = "import sys, qseg.cli; print([m for m in ('transformers', 'peft') if m in sys.modules])"
    assert run(code) == "[]"


def test_unsloth_is_imported_first_where_it_can_run(tmp_path):
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    prelude = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from qseg.unsloth_first import import_unsloth_first\n"
    )
    first = run(
        prelude + "print(import_unsloth_first('auto'), __import__('unsloth').IMPORTED_BEFORE)",
        tmp_path,
    )
    assert first == "True []"
    assert run(prelude + "import sys; print(import_unsloth_first('transformers'), "
               "'unsloth' in sys.modules)", tmp_path) == "False False"  # fmt: skip


def test_without_a_gpu_unsloth_is_not_imported(tmp_path):
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text("raise RuntimeError('imported')")
    code = (
        "import torch; torch.cuda.is_available = lambda: False\n"
        "from qseg.unsloth_first import import_unsloth_first\n"
        "print(import_unsloth_first('auto'))"
    )
    assert run(code, tmp_path) == "False"
