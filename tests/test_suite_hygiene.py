"""The test suite cleans up after itself (a run leaves no data folder of its own behind) and its schedule names real files.

Module- and session-scoped gateways keep their state store and blobs in the run's data folder
(``tests/conftest.py``); each run left one in the temporary folder (150 MB after a full suite, 2.9 GB
after a working day). The check runs a real pytest in a subprocess with its own ``TMPDIR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_removes_its_data_folder(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    record = tmp_path / "run-folder.txt"
    env = {k: v for k, v in os.environ.items() if k != "CTSCREEN_DATA_DIR"}
    env.update(TMPDIR=str(tmp_path), CTSCREEN_RUN_DATA_PROBE=str(record))
    # the probe reads the variable at import, before the autouse fixture gives each test its own folder
    (probe / "test_probe.py").write_text(
        "import os, pathlib\n"
        "RUN = os.environ['CTSCREEN_DATA_DIR']\n"
        "def test_sees_the_run_folder():\n"
        "    assert pathlib.Path(RUN).is_dir()\n"
        "    (pathlib.Path(RUN) / 'blob').write_bytes(b'x')\n"
        "    pathlib.Path(os.environ['CTSCREEN_RUN_DATA_PROBE']).write_text(RUN)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
         "-c", str(ROOT / "pyproject.toml"), "--confcutdir", str(ROOT / "tests"),
         "-p", "tests.conftest", str(probe / "test_probe.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run_folder = Path(record.read_text())
    assert run_folder.name.startswith("ctscreen-test-data-") and run_folder.parent == tmp_path
    assert not run_folder.exists(), f"the run left its data folder behind: {run_folder}"


def test_the_longest_files_named_for_the_schedule_exist() -> None:
    """conftest.LONGEST_FIRST orders the run; a renamed file would silently lose its place."""
    from tests.conftest import LONGEST_FIRST

    assert [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()] == []
