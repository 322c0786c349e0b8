"""``ctscreen phantom``: writes studies with an index; bad arguments give one clear line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from phantom import cli


def test_writes_mixed_studies_and_index(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--out", str(out), "--studies", "2", "--seed", "9", "--slices", "6", "--matrix", "64",
                   "--encoding", "mixed", "--shuffle", "--quiet"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())["studies"]
    assert [s["kind"] for s in index] == ["covid", "normal"]
    assert [s["seed"] for s in index] == [9, 10]
    assert [s["encoding"] for s in index] == ["explicit", "jpeg2000"]
    for s in index:
        folder = out / s["path"]
        assert len(list((folder / "dicom").iterdir())) == 6
        assert (folder / "manifest.json").exists() and (folder / "montage.png").exists()
        assert (folder / "masks" / "lesion.nii.gz").exists()


def test_mixed_cycles_through_every_kind():
    kinds = [cli.kind_for(i, "mixed") for i in range(12)]
    assert kinds[0::2] == ["covid"] * 6
    assert sorted(set(kinds[1::2])) == sorted(k for k in cli.KINDS if k != "covid")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--studies", "-1"], "--studies"),
        (["--studies", "0"], "--studies"),
        (["--seed", "-5"], "--seed"),
        (["--kind", "flu"], "--kind"),
        (["--slices", "-3"], "--slices"),
        (["--encoding", "jpegls"], "--encoding"),
        (["--studies", "two"], "--studies"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, needle):
    rc = cli.main(["--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("ctscreen phantom: error:") and needle in err
    assert len(err.splitlines()) == 1


def test_unwritable_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["--out", str(blocker / "sub"), "--studies", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--out" in err and len(err.splitlines()) == 1
    rc = cli.main(["--out", str(blocker)])
    assert rc == 2 and "not a folder" in capsys.readouterr().err


def test_missing_out_and_help(capsys):
    assert cli.main([]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


def test_console_entry_point_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ctscreen.cli", "phantom", "--out", str(tmp_path), "--studies", "-2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "ctscreen phantom: error: --studies must be a positive integer, got -2"
