"""Rewrites one benchmark's section of ``benchmarks/README.md``, between ``<!-- name:begin -->`` and
``<!-- name:end -->`` (appended at the end the first time), so tables are written by the scripts.

    write_section("benchmarks/README.md", "bench_audit", table_text, "python benchmarks/bench_audit.py")
"""

import pathlib
import re
import time


def write_section(path: str, name: str, text: str, command: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    readme = pathlib.Path(path)
    content = readme.read_text()
    block = f"{begin}\n`{command}` (written by the script, {time.strftime('%Y-%m-%d')}):\n\n{text}\n{end}"
    if begin in content and end in content:
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, content, flags=re.DOTALL)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    readme.write_text(content)
