"""Every ``ctscreen`` subcommand given bad arguments: one clear line on stderr, non-zero exit, no traceback.

Each case runs the real command as a subprocess. Nothing here starts Triton: commands that need a
server are pointed at a free port nobody listens on, or at a port held by this test, and must fail
fast. ``/proc/...`` stands for an output folder that cannot be created (even by root).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from ctscreen.cli import COMMANDS
from gateway.keys import KeyStore

UNWRITABLE = "/proc/ctscreen-no-such-dir/out"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory) -> dict[str, str]:
    """A one-study labelled phantom set (``{phantom}``) and a repository of unreadable ONNX files
    (``{junk_repo}``) for the ``eval --in-process`` cases."""
    root = tmp_path_factory.mktemp("eval-inputs")
    made = _run(["phantom", "--out", str(root / "set"), "--studies", "1", "--slices", "8"])
    assert made.returncode == 0, made.stderr
    for model in ("valid_area", "lesion"):
        (root / "junk" / model / "1").mkdir(parents=True)
        (root / "junk" / model / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return {"phantom": str(root / "set"), "junk_repo": str(root / "junk")}


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = "from ctscreen.cli import main; raise SystemExit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def _charts_gateway(port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The gateway as the chart starts it (``uvicorn --factory gateway.main:app_from_env``), ``env`` added."""
    argv = ["-m", "uvicorn", "--factory", "gateway.main:app_from_env", "--port", str(port)]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, **env})


# (argv, a fragment of the expected error line); {tmp}, {free}, {taken} are filled in per test, {phantom} and
# {junk_repo} by the eval_inputs fixture
CASES = [
    (["bogus"], "unknown command 'bogus'"),
    (["phantom", "--out", "{tmp}/p", "--studies", "-1"], "--studies must be a positive integer"),
    (["phantom", "--out", UNWRITABLE], "cannot be created"),
    (["phantom", "--out", "{tmp}/p", "--kind", "nope"], "--kind must be one of"),
    (["train", "lesion", "--steps", "-1"], "--steps"),
    (["train", "lesion", "--bogus"], "unrecognized arguments: --bogus"),
    (["export", "lesion", "--untrained", "--out", UNWRITABLE + "/m.onnx"], "--out"),  # was: a traceback
    (["export", "lesion", "--checkpoint", "{tmp}/missing.ckpt"], "no such file"),
    (["repo", "build", "--profile", "nope", "--out", "{tmp}/r"], "invalid choice: 'nope'"),
    (["triton", "--grpc-port", "-1"], "grpc_port"),
    (["triton", "--timeout", "-1"], "--timeout must be > 0"),  # was: "not ready after -1 s", exit 1
    (["triton", "--log-file", UNWRITABLE + "/t.log"], "--log-file"),  # was: a traceback
    (["triton", "--grpc-port", "{taken}"], "already in use"),
    (["serve", "--port", "-1"], "--port must be 0..65535"),
    (["serve", "--triton-url", "http://x:1", "--port", "{free}"], "without a scheme"),
    (["serve", "--repo", "{tmp}/missing", "--port", "{free}"], "no such folder"),
    (["screen", "{tmp}/missing"], "no such file or folder"),
    (["screen", "--url", "ftp://x", "{tmp}"], "must start with http:// or https://"),
    (["screen", "--url", "http://127.0.0.1:{free}", "{tmp}"], "no ctscreen gateway answers"),
    (["demo", "--slices", "-1", "--port", "{free}"], "--slices must be"),
    (["eval", "--data", "{tmp}/missing"], "not a directory"),
    (["eval", "--data", "{tmp}", "--url", "ftp://x"], "must start with http:// or https://"),  # was: "cannot connect"
    (["eval", "--data", "{tmp}", "--triton-url", "notaurl"], "host:port"),  # was: a pydantic traceback
    (["eval", "--data", "{tmp}", "--url", "http://127.0.0.1:{free}", "--out", UNWRITABLE], "--out"),
    (["eval", "--data", "{tmp}", "--limit", "-1"], "--limit"),
    (["eval", "--data", "{phantom}", "--in-process", "--repo", "{tmp}", "--out", "{tmp}/o"],
     "ONNX model not found"),  # was: a FileNotFoundError traceback
    (["eval", "--data", "{phantom}", "--in-process", "--repo", "{junk_repo}", "--out", "{tmp}/o"],
     "ONNX Runtime cannot load the models"),  # was: an InvalidProtobuf traceback
    (["bench", "--results", UNWRITABLE, "report"], "--results"),  # was: a traceback
    (["bench", "load", "--url", "ftp://x"], "must start with http:// or https://"),  # was: "not loopback"
    (["bench", "decode", "--repeat", "0"], "--repeat must be >= 1"),  # was: UnboundLocalError traceback
    (["bench", "phantom", "--slices", "-3"], "--slices must be in 1..2000"),  # was: CalledProcessError traceback
    (["serve", "--port", "{taken}", "--triton-url", "127.0.0.1:{free}"], "already in use"),
    (["demo", "--port", "{taken}", "--exit"], "already in use"),
    (["serve", "--port", "{free}", "--dicom-port", "{taken}", "--triton-url", "127.0.0.1:{free}"],
     "--dicom-port"),
    (["screen", "--url", "http://[::1", "{tmp}"], "is not a valid URL"),
    (["screen", "--timeout", "-1", "{tmp}"], "--timeout must be > 0"),
    (["demo", "--out", UNWRITABLE, "--exit", "--port", "{free}"], "cannot be created"),
    (["db", "bogus"], "invalid choice: 'bogus'"),
    (["db", "downgrade"], "the following arguments are required: REVISION"),  # no default: base drops everything
    (["db", "downgrade", "head"], "unknown revision 'head': name one this release ships"),
    (["db", "upgrade", "--revision", "9999"], "unknown revision '9999': name one this release ships"),  # was: Alembic's
    (["serve", "--host", "nosuch.invalid", "--insecure", "--port", "{free}"], "--host nosuch.invalid cannot be resolved"),
    (["serve", "--host", "192.0.2.1", "--insecure", "--port", "{free}"], "is 192.0.2.1 an address of this machine"),
    (["train", "lesion", "--device", "bogus"], "--device 'bogus'"),  # was: a RuntimeError traceback
    (["keys", "--file", "{tmp}/missing.json", "list"], "no API key file at"),  # was: an empty table, exit 0
    (["export", "lesion", "--checkpoint", "{tmp}/notes.txt", "--out", "{tmp}/m.onnx"],
     "is not a ctscreen checkpoint"),  # was: an UnpicklingError traceback
]


def _id(case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return "-".join(a.strip("-") for a in argv if "{" not in a and "/" not in a)[:40]


# bad settings from the environment: (argv, CTSCREEN_DATABASE_URL, a fragment of the expected error line)
ENV_CASES = [
    (["db", "current"], "mysql://u@db/x", "scheme 'mysql' is not supported"),
    (["db", "upgrade"], "postgresql://u:s3cret@127.0.0.1:{free}/x", "ConnectionRefusedError"),
    (["serve", "--port", "{free}", "--triton-url", "127.0.0.1:{free}"], "postgresql://u:s3cret@127.0.0.1:{free}/x",
     "state store postgresql://u:***@127.0.0.1:"),
]


@pytest.mark.parametrize(("argv", "url", "expected"), ENV_CASES, ids=["db-scheme", "db-unreachable", "serve-db"])
def test_a_bad_or_unreachable_database_gives_one_line_without_its_password(argv, url, expected, tmp_path):
    fill = {"tmp": str(tmp_path), "free": _free_port()}
    p = _run([a.format(**fill) for a in argv],  # serve does not wait for a database not up yet
             env={"CTSCREEN_DATABASE_URL": url.format(**fill), "CTSCREEN_DB_START_WAIT_S": "0"})
    _one_clear_line(p, expected)
    assert "s3cret" not in p.stderr + p.stdout


# a bad Triton discovery setting stops serve at start, before Triton: (environment, the expected error line)
DISCOVERY_CASES = [
    ({"CTSCREEN_TRITON_DISCOVERY": "consul"},
     "CTSCREEN_TRITON_DISCOVERY: Input should be 'static', 'endpointslice' or 'dns'"),
    ({"CTSCREEN_TRITON_DISCOVERY": "dns"}, "CTSCREEN_TRITON_SERVICE: CTSCREEN_TRITON_DISCOVERY=dns needs"),
    ({"CTSCREEN_TRITON_GRPC_PORT": "grpc"}, "CTSCREEN_TRITON_GRPC_PORT: Input should be a valid integer"),
    ({"CTSCREEN_TRITON_DNS_INTERVAL_S": "-1"}, "CTSCREEN_TRITON_DNS_INTERVAL_S: Input should be greater than 0"),
    ({"CTSCREEN_JOB_DEADLINE_S": "inf"}, "CTSCREEN_JOB_DEADLINE_S: Input should be a finite number"),  # was: accepted
    # rules of the whole model, whose errors name no field: the line named no variable
    ({"CTSCREEN_DICOM_SOP_CLASSES": "CTImageStorage"},
     "CTSCREEN_DICOM_SOP_CLASSES: ['CTImageStorage'] are not CT storage classes"),
    ({"CTSCREEN_DICOM_ALLOWED_PEERS": "CT1"}, "CTSCREEN_DICOM_ALLOWED_PEERS: DICOM peer 'CT1' must read AE@host"),
]


@pytest.mark.parametrize(("env", "expected"), DISCOVERY_CASES, ids=[next(iter(c[0])) for c in DISCOVERY_CASES])
def test_a_bad_setting_stops_serve_in_one_line(env, expected):
    free = _free_port()
    _one_clear_line(_run(["serve", "--port", str(free), "--triton-url", f"127.0.0.1:{free}"], env=env), expected)


@pytest.mark.parametrize(("env", "expected"), DISCOVERY_CASES[:2], ids=[next(iter(c[0])) for c in DISCOVERY_CASES[:2]])
def test_a_bad_discovery_setting_stops_the_charts_gateway_in_one_line(env, expected):
    """The chart runs ``uvicorn --factory gateway.main:app_from_env``: same one line, no traceback."""
    _one_clear_line(_charts_gateway(_free_port(), env), expected)


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[_id(c) for c in CASES])
def test_bad_arguments_give_one_clear_line(argv, expected, tmp_path, taken_port, request):
    fill = {"tmp": str(tmp_path), "free": _free_port(), "taken": taken_port}
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    if any("{phantom}" in a or "{junk_repo}" in a for a in argv):
        fill.update(request.getfixturevalue("eval_inputs"))
    _one_clear_line(_run([a.format(**fill) for a in argv]), expected)


def _one_clear_line(p: subprocess.CompletedProcess, expected: str) -> None:
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    # argparse prints its usage lines first (``usage:`` and indented continuations): not error lines
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ctscreen"), p.stderr
    assert expected in lines[0], p.stderr


def test_a_missing_command_exits_2_as_argparse_does_and_help_0():
    """Bare ``ctscreen`` printed the usage and exited 0: a script that ran it with a command left out (an empty
    variable) went on as if it had worked. It exits 2 with argparse's usage line and one error line; ``--help`` 0."""
    _one_clear_line(bare := _run([]), "ctscreen: error: a command is required: one of phantom, train")
    assert bare.returncode == 2 and bare.stdout == "", bare
    shown = _run(["--help"])
    assert shown.returncode == 0 and shown.stdout.startswith("usage: ctscreen <command>") and shown.stderr == ""
    assert all(f"  {name} " in shown.stdout for name in COMMANDS), shown.stdout


@pytest.mark.parametrize("command", [[c] for c in COMMANDS] + [["keys", "add"], ["keys", "revoke"], ["db", "downgrade"]],
                         ids=" ".join)
def test_every_positional_argument_is_explained(command):
    """``ctscreen send --help`` listed JOB_ID with no word of what it is, ``ctscreen keys revoke --help`` its id:
    every other command says what its positional arguments are."""
    shown = _run([*command, "--help"]).stdout
    lines = shown.partition("positional arguments:\n")[2].partition("\n\n")[0].splitlines() + [""]
    for i, line in enumerate(lines[:-1]):  # an argument: its text beside it, or below it, further in (or its choices)
        if line.startswith("  ") and not line.startswith("   "):
            assert len(line.split()) > 1 or lines[i + 1].startswith("   "), shown


def test_python_m_ctscreen_is_the_ctscreen_command():
    """``python -m ctscreen`` failed ("No module named ctscreen.__main__; ..."): where the console script is not on PATH
    (a virtualenv not activated) there was no way in by the package's name. It runs the same entry point."""
    for argv in (["--help"], ["phantom", "--help"]):
        by_module = subprocess.run([sys.executable, "-m", "ctscreen", *argv], capture_output=True, text=True,
                                   timeout=60, stdin=subprocess.DEVNULL)
        assert by_module.returncode == 0 and by_module.stderr == "", by_module
        assert by_module.stdout == _run(argv).stdout and by_module.stdout.startswith("usage: ctscreen"), by_module
    missing = subprocess.run([sys.executable, "-m", "ctscreen"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    assert missing.returncode == 2 and "a command is required" in missing.stderr, missing


def test_an_unreadable_api_key_file_stops_serve_the_charts_gateway_and_keys_in_one_line(tmp_path):
    """The gateway started with it, and answered every keyed call 503 (AttributeError); ``keys list`` crashed."""
    bad = tmp_path / "keys.json"
    bad.write_text("[1, 2]")
    env = {"CTSCREEN_AUTH_API_KEYS_FILE": str(bad)}
    free = _free_port()
    _one_clear_line(_run(["serve", "--port", str(free), "--triton-url", f"127.0.0.1:{free}"], env=env),
                    "CTSCREEN_AUTH_API_KEYS_FILE: API key file")
    _one_clear_line(_charts_gateway(free, env), "must hold a JSON object")
    _one_clear_line(_run(["keys", "--file", str(bad), "list"]), "cannot be read")
    edited = tmp_path / "edited.json"  # by hand, "scopes": "admin": a key of the scopes a, d, m, i, n (403 everywhere)
    KeyStore(edited).add("ops", ["admin"])
    data = json.loads(edited.read_text())
    data["keys"][0]["scopes"] = "admin"
    edited.write_text(json.dumps(data))
    _one_clear_line(_run(["keys", "--file", str(edited), "list"]), "must be a list of some of studies:write")
    inside_a_file = str(bad / "keys.json")  # stat() raises NotADirectoryError, not FileNotFoundError
    _one_clear_line(_run(["serve", "--port", str(free), "--triton-url", f"127.0.0.1:{free}"],
                         env={"CTSCREEN_AUTH_API_KEYS_FILE": inside_a_file}), "Not a directory")


def test_a_taken_metrics_port_stops_serve_in_one_line_naming_its_variable(taken_port):
    """It started Triton, then failed with the lifespan's OSError traceback, blaming --port."""
    free = _free_port()
    _one_clear_line(_run(["serve", "--port", str(free), "--triton-url", f"127.0.0.1:{free}"],
                         env={"CTSCREEN_METRICS_PORT": str(taken_port)}), "CTSCREEN_METRICS_PORT")


def test_a_misspelt_setting_is_named_at_start_with_the_setting_it_resembles(tmp_path):
    """Settings ignores CTSCREEN_* variables it does not know (the prefix also serves the client and the embedded
    Triton), so CTSCREEN_TRITON_BATCHSIZE=16 started a gateway with batch size 2 and no word. Both starts name it;
    an unreadable key file then stops each, after the settings were read."""
    bad = tmp_path / "keys.json"
    bad.write_text("[1, 2]")
    env = {"CTSCREEN_AUTH_API_KEYS_FILE": str(bad), "CTSCREEN_TRITON_BATCHSIZE": "16"}
    hint = "CTSCREEN_TRITON_BATCHSIZE is no ctscreen setting and is ignored (did you mean CTSCREEN_TRITON_BATCH_SIZE?)"
    free = _free_port()
    serve = _run(["serve", "--port", str(free), "--triton-url", f"127.0.0.1:{free}"], env=env)
    for p in (serve, _charts_gateway(free, env)):
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert hint in p.stderr, p.stderr


READER_LEAVES = [["--help"], ["--version"], ["keys", "--help"], ["keys", "--file", "{tmp}/keys.json", "list"],
                 ["db", "current"], ["db", "downgrade", "0014", "--dry-run"]]


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("argv", READER_LEAVES, ids=["help", "version", "keys-help", "keys-list", "db-current",
                                                     "db-downgrade"])
def test_a_reader_that_leaves_early_ends_the_command_quietly(argv, buffered, tmp_path):
    """``ctscreen --help | head -1`` (and ``ctscreen screen ... | head -1``, whose verdict table is printed the same
    way): the reader closed the pipe before the command wrote, and the command died with a BrokenPipeError
    traceback. It ends with 141, as a shell reports a command stopped by SIGPIPE, and says nothing. ``keys`` and
    ``db`` took the error for one of their own and said "ctscreen keys: [Errno 32] Broken pipe", exit 1. Standard
    output buffered (a pipe's default), nothing failed before the flush at exit: "Exception ignored ...
    BrokenPipeError", exit 120 (unbuffered, as PYTHONUNBUFFERED=1 makes it, the write itself fails)."""
    env = {**os.environ, "CTSCREEN_DATA_DIR": str(tmp_path)}
    env.pop("CTSCREEN_DATABASE_URL", None)
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    KeyStore(tmp_path / "keys.json").add("pacs", ["studies:write"])
    if argv[0] == "db":
        assert _run(["db", "upgrade"], env={"CTSCREEN_DATA_DIR": str(tmp_path)}).returncode == 0
    p = _into_a_closed_pipe([a.format(tmp=tmp_path) for a in argv], env)
    assert (p.returncode, p.stderr) == (141, "")


def _into_a_closed_pipe(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``ctscreen ARGV`` with standard output a pipe whose reader is gone before the first byte (every write fails
    with EPIPE), standard error captured."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        code = "from ctscreen.cli import main; raise SystemExit(main())"
        return subprocess.run([sys.executable, "-c", code, *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_key_whose_reader_left_before_it_was_shown_is_revoked_and_said_so(buffered, tmp_path):
    """``ctscreen keys add NAME --scopes ... | ...`` whose reader left: the key was saved, never shown (it is shown
    only once), and the command ended quietly, leaving a working key nobody holds. It is revoked, and standard
    error says so and what to do."""
    env = {**os.environ}
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    keys = tmp_path / "keys.json"
    p = _into_a_closed_pipe(["keys", "add", "pacs", "--scopes", "studies:write", "--file", str(keys)], env)
    assert p.returncode == 141 and "Traceback" not in p.stderr, p.stderr
    (record,) = KeyStore(keys).keys()
    assert record.revoked_at is not None
    assert p.stderr == f"ctscreen keys: key {record.id} (pacs) could not be shown and is revoked; add it again\n"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help_is_plain_text(command):
    """``ctscreen phantom --help`` opened "``ctscreen phantom``: write synthetic ...", ``ctscreen bench --help``
    "``ctscreen bench`` (also ``python -m benchmarks``)": their module docstrings' reST, as written."""
    shown = _run([command, "--help"])
    assert shown.returncode == 0 and shown.stdout.startswith("usage: ctscreen"), shown.stderr
    assert "``" not in shown.stdout, shown.stdout
