"""``ctscreen serve/screen/demo/db`` argument handling and output, without a server (errors are one line)."""

from __future__ import annotations

import pytest

from ctscreen.embedded import free_port
from gateway.cli import demo_main, screen_main, serve_main
from gateway.client import Outcome, collect_files, verdict_table


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (screen_main, ["/no/such/study"], "no such file or folder"),
        (screen_main, [".", "--url", "ftp://x"], "--url must start with http"),
        (serve_main, ["--port", "70000"], "--port must be 0..65535"),
        # --port 0: the default 8000 may be taken on the machine (a running demo); that check comes first
        (serve_main, ["--port", "0", "--triton-url", "grpc://a:1"], "without a scheme"),
        (demo_main, ["--port", "0", "--slices", "3"], "--slices must be 8..1000"),
        (demo_main, ["--port", "0", "--repo", "/no/such/repo"], "no such folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_screen_without_a_gateway_is_one_line(tmp_path, capsys):
    (tmp_path / "a.dcm").write_bytes(b"x")
    rc = screen_main([str(tmp_path), "--url", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 1 and "no ctscreen gateway answers" in err and len(err.strip().splitlines()) == 1


def test_collect_files_skips_sidecars(tmp_path):
    for name in ("s1.dcm", "s2", "manifest.json", "montage.png", "mask.nii.gz", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_files(tmp_path)] == ["s1.dcm", "s2"]


def test_verdict_table():
    result = {"verdict": "positive", "reason": "run_found", "n_slices": 40,
              "evidence": {"quadrant": "top_left", "n_slices": 3, "slices": [{"index": 7}, {"index": 8}, {"index": 9}]}}
    table = verdict_table([Outcome("covid", result=result, seconds=2.0),
                           Outcome("bad", error={"reason": "not_dicom", "message": "no"})], {"covid": "covid"})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["study", "truth", "verdict"]
    assert "POSITIVE" in lines[2] and "right anterior x3 slices 8-10" in lines[2]  # indexes 7-9, numbered from 1
    assert "not a diagnosis" in lines[-1]
    not_chest = {**result, "verdict": "indeterminate", "reason": "not_chest"}  # its boxes are no lung lesions
    assert verdict_table([Outcome("head", result=not_chest, seconds=1.0)]).splitlines()[2].split()[4] == "-"
    assert "ERROR" in lines[3] and "not_dicom" in lines[3]


def test_an_error_the_table_cuts_is_printed_whole_below_it():
    """``ctscreen screen DIR`` on a folder of two studies (``ctscreen phantom --studies 2``) printed "The upload
    holds CT images of 2 studies: 1.2.826.0.1.3680043" and no more: the table cut every error to 60 characters,
    and with it what to do (upload one study at a time; set $CTSCREEN_TOKEN; the scope a key lacks)."""
    advice = "Upload one study at a time (or send them by STOW-RS, which screens each study apart)."
    message = f"The upload holds CT images of 2 studies: {'1.2.826.0.1.3680043.8.498.' + '7' * 38} (40 files). {advice}"
    result = {"verdict": "negative", "reason": "no_findings", "n_slices": 40, "evidence": None}
    table = verdict_table([Outcome("out", error={"reason": "mixed_studies", "message": message}, seconds=0.5),
                           Outcome("normal", result=result, seconds=1.0),
                           Outcome("bad", error={"reason": "not_dicom", "message": "no"})])
    lines = table.splitlines()
    row = lines[2]
    assert "mixed_studies" in row and row.split("  ")[-1].strip() == "0.5"
    assert "The upload holds CT images of 2 studies" in row and "... " in row and advice not in row
    assert "not a diagnosis" in lines[5]
    assert lines[-2:] == ["", f"out: mixed_studies: {message}"]  # whole, once; "no" fits the table
    assert sum(advice in line for line in lines) == 1


def test_a_dicom_port_that_is_the_api_port_is_one_line(capsys):
    port = free_port()
    with pytest.raises(SystemExit) as exc:
        serve_main(["--port", str(port), "--dicom-port", str(port), "--triton-url", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is the API's --port" in err and "Traceback" not in err


@pytest.mark.parametrize("problem", ["blob_folder_is_a_file", "tls_file_missing"])
def test_a_start_up_the_gateway_cannot_make_is_one_line_before_triton_starts(tmp_path, monkeypatch, capsys, problem):
    """A file where the blob folder goes, or a DICOM TLS certificate that is not there: each was a 60-line
    traceback from the gateway's start-up, after the embedded Triton had started, then '(port taken?)'. A
    --triton-url nobody serves: nothing may be started before the check."""
    monkeypatch.setenv("CTSCREEN_DATA_DIR", str(tmp_path / "data"))
    argv = ["--port", "0", "--triton-url", "127.0.0.1:1"]
    if problem == "blob_folder_is_a_file":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "blobs").write_text("in the way")
    else:
        monkeypatch.setenv("CTSCREEN_DICOM_TLS_CERT", str(tmp_path / "none.pem"))
        monkeypatch.setenv("CTSCREEN_DICOM_TLS_KEY", str(tmp_path / "none.key"))
        argv += ["--dicom-port", str(free_port())]
    rc = serve_main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err, err
    assert ("the blob store" in err) if problem == "blob_folder_is_a_file" else ("CTSCREEN_DICOM_TLS_CERT" in err)
    assert len(err.strip().splitlines()) <= 2, err


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_db_current_without_a_sqlite_file_says_there_is_none_and_makes_none(folder, tmp_path, monkeypatch, capsys):
    """A data folder that did not exist gave a raw "OperationalError: ... unable to open database file"; an
    empty one got an empty ctscreen.db made by the question."""
    from gateway.cli import db_main
    from gateway.store.migrate import head

    data = tmp_path / "data"
    if folder == "empty":
        data.mkdir()
    monkeypatch.delenv("CTSCREEN_DATABASE_URL", raising=False)
    monkeypatch.setenv("CTSCREEN_DATA_DIR", str(data))
    assert db_main(["current"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"state store sqlite:///{data}/ctscreen.db: no database yet, revision none (newest {head()}); "
                          "`ctscreen db upgrade` creates it\n", "")
    assert sorted(tmp_path.rglob("*")) == ([data] if folder == "empty" else [])
    assert db_main(["upgrade"]) == 0 and db_main(["current"]) == 0
    assert capsys.readouterr().out.endswith(f"revision {head()} (newest {head()})\n")


def test_db_upgrade_says_the_revision_it_reached_and_not_a_target_it_did_not(tmp_path, monkeypatch, capsys):
    """``ctscreen db upgrade --revision 0010`` on a database at the newest revision changed nothing (Alembic
    goes only forward) and printed "upgraded to 0010"; without ``--revision`` it printed "upgraded to head". It
    names the revision the database is at, and says when there was nothing to do."""
    from gateway.cli import db_main
    from gateway.store.migrate import database_revision, head

    monkeypatch.delenv("CTSCREEN_DATABASE_URL", raising=False)
    monkeypatch.setenv("CTSCREEN_DATA_DIR", str(tmp_path))
    url = f"sqlite:///{tmp_path}/ctscreen.db"
    assert db_main(["upgrade", "--revision", "0010"]) == 0
    assert capsys.readouterr().out == f"state store {url}: upgraded to 0010 (newest {head()})\n"
    assert db_main(["upgrade"]) == 0
    assert capsys.readouterr().out == f"state store {url}: upgraded from 0010 to {head()}\n"
    assert db_main(["upgrade", "--revision", "0010"]) == 0
    assert capsys.readouterr().out == (f"state store {url}: at revision {head()}, past 0010 already: nothing to "
                                       f"upgrade (`ctscreen db downgrade 0010` goes back)\n")
    assert db_main(["upgrade"]) == 0
    assert capsys.readouterr().out == f"state store {url}: at revision {head()} already: nothing to upgrade\n"
    assert database_revision(url) == head()


@pytest.mark.parametrize("bad", ["9999", "heads", "+1", "001", "0010:0015", "base", "-1"])
def test_db_upgrade_refuses_a_revision_it_does_not_ship_in_one_line_as_downgrade_does(bad, tmp_path, monkeypatch,
                                                                                        capsys):
    """``ctscreen db upgrade --revision 9999`` answered with Alembic's own "CommandError: Can't locate revision
    identified by '9999'" (a relative or range target, its other errors; heads and a prefix of several ids were
    taken, then said "past heads already"), where ``db downgrade 9999`` names the revisions this release ships.
    Upgrade answers the same way: one line, exit 1, the database left as it was (and none made)."""
    from gateway.cli import db_main
    from gateway.store.migrate import database_revision, head, revisions

    monkeypatch.delenv("CTSCREEN_DATABASE_URL", raising=False)
    monkeypatch.setenv("CTSCREEN_DATA_DIR", str(tmp_path))
    expected = f"ctscreen db: unknown revision {bad!r}: name one this release ships ({', '.join(revisions())}) or head\n"
    assert db_main(["upgrade", "--revision", bad]) == 1
    assert capsys.readouterr() == ("", expected)
    assert list(tmp_path.iterdir()) == []  # no database made for a target refused
    assert db_main(["upgrade", "--revision", "0010"]) == 0
    capsys.readouterr()
    assert db_main(["upgrade", f"--revision={bad}"]) == 1
    assert capsys.readouterr() == ("", expected)
    assert database_revision(f"sqlite:///{tmp_path}/ctscreen.db") == "0010" != head()


def test_a_database_recording_two_revisions_is_named_in_one_line_by_every_db_command_and_serve(tmp_path, monkeypatch,
                                                                                              capsys):
    """An alembic_version table with two rows (not a database ctscreen migrated: its history is one line, one row)
    gave Alembic's raw "CommandError: Version table 'alembic_version' has more than one head present; please use
    get_current_heads()" from db current, upgrade and downgrade, and from serve's start. Each says what it found,
    in one line, exit 1, and changes nothing."""
    import sqlite3

    from gateway.cli import db_main

    monkeypatch.delenv("CTSCREEN_DATABASE_URL", raising=False)
    monkeypatch.setenv("CTSCREEN_DATA_DIR", str(tmp_path))
    assert db_main(["upgrade", "--revision", "0010"]) == 0
    with sqlite3.connect(tmp_path / "ctscreen.db") as db:
        db.execute("INSERT INTO alembic_version VALUES ('0009')")
    capsys.readouterr()
    said = (f"state store sqlite:///{tmp_path}/ctscreen.db records 2 revisions (0009, 0010) in its alembic_version "
            "table, where ctscreen's records one")
    for argv in (["current"], ["upgrade"], ["upgrade", "--revision", "0012"], ["downgrade", "0005"]):
        assert db_main(argv) == 1, argv
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith(f"ctscreen db: {said}"), (argv, err)
    rc = serve_main(["--port", str(free_port()), "--triton-url", f"127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith(f"ctscreen serve: {said}"), err
    with sqlite3.connect(tmp_path / "ctscreen.db") as db:
        assert sorted(db.execute("SELECT version_num FROM alembic_version")) == [("0009",), ("0010",)]


def test_serve_help_describes_serve_alone(capsys):
    """``ctscreen serve --help`` printed the whole module's list: screen, db and demo too."""
    with pytest.raises(SystemExit) as exc:
        serve_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "The embedded Triton (cpu profile) and the gateway on localhost" in out
    assert "screen PATH" not in out and "db upgrade" not in out and "``" not in out.split("options:")[0]


def test_send_names_its_force_option_when_the_result_was_delivered(monkeypatch, capsys):
    """The gateway's 409 says ``force=true`` (its query parameter); ``ctscreen send`` has ``--force``."""
    import httpx

    from gateway import cli

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"reason": "not_resendable", "message": "Job j1 was delivered to pacs "
                                         "already; force=true sends it again."})

    monkeypatch.setattr(cli, "http_client", lambda url, timeout: httpx.Client(
        base_url=url, transport=httpx.MockTransport(answer)))
    assert cli.send_main(["j1", "--to", "pacs", "--url", "http://testserver"]) == 1
    assert capsys.readouterr().err == "ctscreen send: Job j1 was delivered to pacs already; --force sends it again.\n"
