"""What the benchmark scripts share: rewriting their marked section of a README, machine load, and
comma-list options.

A script owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; everything else in
the file (the hand-written prose around it) is left as it is::

    write_section("benchmarks/README.md", "bench_compile", table, "python benchmarks/bench_compile.py")
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import re
import sys
import time


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: str, name: str, text: str, command: str) -> None:
    """Replaces the ``name`` section of ``path`` with ``text`` under the command that made it.

    A file without the markers gets the section appended at its end.
    """
    begin, end = markers(name)
    readme = pathlib.Path(path)
    content = readme.read_text()
    block = f"{begin}\n`{command}` (written by the script, {time.strftime('%Y-%m-%d')}):\n\n{text}\n{end}"
    if begin in content and end in content:
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, content, flags=re.DOTALL)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    readme.write_text(content)


def shown_command(script: str, argv: list[str], hidden: tuple[str, ...] = ("--readme",)) -> str:
    """The command line that reproduces a run, without the flags (and their values) in ``hidden``."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in hidden:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in hidden)):
            shown.append(arg)
    return " ".join([f"python {script}", *shown])


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return float("nan")


def machine_line(load_start: float) -> str:
    return (f"machine: {os.cpu_count()} CPUs, 1-minute load average {load_start:.1f} at the start, "
            f"{load_average():.1f} at the end")


def pyplot(path: str):
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (saying so) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'); {path} not written", file=sys.stderr)
        return None
    return plt


def option(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), else None.

    Read before argparse, so that a script's whole run can be captured (argparse still checks it).
    """
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def printed_section(path: str | None, name: str, script: str, argv: list[str], hidden=("--readme",)):
    """Prints as usual; with ``path`` set, also writes everything printed as the ``name`` section.

    For scripts whose report is their printed output::

        with printed_section(args.readme, "bench_step", "benchmarks/bench_step.py", sys.argv[1:]):
            main()
    """
    if path is None:
        yield
        return
    load_start = load_average()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
        yield
        print(machine_line(load_start))
    write_section(path, name, "```\n" + buffer.getvalue().rstrip() + "\n```", shown_command(script, argv, hidden))


def comma_list(allowed: tuple[str, ...]):
    """An argparse ``type`` for a comma list of choices (``--remat dots,full``), each checked."""

    def parse(text: str) -> list[str]:
        values = text.split(",")
        for value in values:
            if value not in allowed:
                raise argparse.ArgumentTypeError(f"'{value}': use {', '.join(allowed)}, or a comma list of them")
        return values

    return parse
