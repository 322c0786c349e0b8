"""The ``ctscreen`` command: one entry point, one subcommand per package.

Each subcommand lives in the package that owns it and is imported only when called, so that
``ctscreen screen`` never imports torch and ``ctscreen phantom`` never imports tritonclient.
A subcommand is a function ``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import Any, TextIO

COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("phantom.cli", "synthetic chest-CT studies with ground truth, as DICOM series"),
    "train": ("training.cli:train_main", "train the valid-area or lesion UNet++"),
    "export": ("training.cli:export_main", "export a checkpoint to ONNX with its model card"),
    "repo": ("ctscreen.repo", "render the Triton model repository (cpu, gpu or gpu-ort profile)"),
    "triton": ("ctscreen.embedded", "run the embedded tritonserver on the cpu repository"),
    "serve": ("gateway.cli:serve_main", "run the embedded Triton and the gateway on localhost"),
    "db": ("gateway.cli:db_main", "the gateway's state store schema: ctscreen db upgrade|downgrade REVISION|current"),
    "screen": ("gateway.cli:screen_main", "upload studies to a gateway and print verdicts"),
    "send": ("gateway.cli:send_main", "send a job's result to a PACS / RIS destination again"),
    "demo": ("gateway.cli:demo_main", "make sample studies, screen them, keep the service running"),
    "keys": ("gateway.keys", "API keys of the gateway: add (printed once), list, revoke"),
    "eval": ("evaluation.cli:eval_main", "evaluate a labelled set through the serving path"),
    "bench": ("benchmarks.cli", "benchmarks: model level, case level, ratios, scaling"),
}


def _usage() -> str:
    lines = ["usage: ctscreen <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'ctscreen <command> --help' for the options of one command."]
    return "\n".join(lines)


class ReaderLeft(BaseException):
    """Standard output's reader left (``ctscreen keys list | head -1``). A BaseException, as KeyboardInterrupt is, so
    that a subcommand's handler of its own errors in one line (``except OSError``, ``except Exception``) and
    argparse's help (which ignores an OSError) let it through to :func:`main`."""


class _Stdout:
    """Standard output whose BrokenPipeError, in the main thread, is :class:`ReaderLeft`; the rest is the stream's
    own. (In another thread, ``ctscreen serve``'s gateway writing its audit trail and access log there, it stays a
    BrokenPipeError, which logging reports and survives: a ReaderLeft would fail the request.)"""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _reader_left()
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _reader_left()
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _reader_left() -> None:
    if threading.current_thread() is threading.main_thread():
        raise ReaderLeft from None


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    if stdout is None:  # started with standard output closed (>&-): print writes nothing, as it did
        return _main(argv)
    sys.stdout = _Stdout(stdout)
    try:
        try:
            return _main(argv)
        finally:  # a pipe is buffered: a reader that left shows here, not in the flush at exit
            sys.stdout.flush()
    except (ReaderLeft, BrokenPipeError):  # BrokenPipeError: one written past sys.stdout (its buffer, its fd)
        # the reader of standard output left (``ctscreen screen ... | head``): end quietly, as a shell reports a
        # command that SIGPIPE stopped; standard output goes to /dev/null so that its flush at exit raises nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
        return 141
    finally:
        sys.stdout = stdout


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a command missing, as argparse answers it: its usage line and one error line, exit 2
        print(f"{_usage().splitlines()[0]}\nctscreen: error: a command is required: one of {', '.join(COMMANDS)} "
              "(see 'ctscreen --help')", file=sys.stderr)
        return 2
    if argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from ctscreen import __version__

        print(f"ctscreen {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ctscreen: unknown command {name!r}; commands: {', '.join(COMMANDS)} (see 'ctscreen --help')",
              file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name or "main")
    try:
        return int(func(rest) or 0)
    except KeyboardInterrupt:
        print("ctscreen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
