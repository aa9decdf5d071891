"""Shared by the bench scripts: what machine this is, and printing/appending a result table."""
from __future__ import annotations

import os
import platform
from typing import Optional


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


def machine() -> str:
    return f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores"


def emit(text: str, markdown_out: Optional[str]) -> None:
    """Print the table and, when asked, append it to a markdown file (bench/RESULTS.md)."""
    print(text)
    if markdown_out:
        with open(markdown_out, "a") as f:
            f.write("\n" + text)
