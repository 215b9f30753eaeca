"""CI's bounded run of the atheris target fuzz/fuzz_apply.py (see fuzz/README.md).

The target applies each input with the tar engine into a scratch directory and fails on any
exception that is not graphdriver's own, or on any change outside the scratch directory.  CI runs
it for ``GRAPHDRIVER_FUZZ_SECONDS`` (default 30) from a seed corpus the target writes itself, plus
the inputs that once crashed it (kept below as regression cases).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "fuzz" / "fuzz_apply.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install atheris)")

# Inputs the fuzzer found (base64); each must now be handled: a graphdriver error or an apply.
def _pax_nul_xattr() -> bytes:
    """A file whose PAX xattr name holds a NUL (as Go's testdata/pax-nul-xattrs.tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("bad-xattr")
        ti.size = 1
        ti.pax_headers = {"SCHILY.xattr.user.a\x00b": "v"}
        t.addfile(ti, io.BytesIO(b"x"))
    return buf.getvalue()


REGRESSIONS = {
    # a non-UTF-8 byte in a GNU.sparse.map PAX value: UnicodeEncodeError escaped the reader
    # (a work-in-progress tarstream.py; kept as a regression input)
    "pax-sparse-map-not-utf8": zlib.decompress(base64.b64decode(
        "eNrtm91u20YUhJ1bP4V7nzg7Z//IC982vSoKBH0AtVEKt4ltWE6R9jX6wuUZJkGk+tgduLJShCvQNnbIQ31DDXdJ"
        "ypur1fVm/eyXi3dHe2tpaq0U/41e0+e/2ZD7Ecx6L8V6ntaznGs7Onl59Ajt3eZmdX1ycvRq9fv5qzvWu09/kDsf"
        "fAj+zkF/Dfr7Vv+TT2WQ7tg7gr0j2DuCvaPf3m9BfQvqW1Dfgvo5qJ+D+jmon4P6JahfgvolqF+C+jWoX4P6Nahf"
        "g/ptu/6T3ePfgv20YD8t2E8POHpQvwf1++31EaQEQUoQpAQpqB/kAEEOEOQAQQ4Q5ABBDhDkAEEOEOQAOznYPf4I"
        "8oAgDwjygCAPCPKAIA8I8oAgDwjygCAPaEH9IAcIcoAgBwhygCAHCHKAIAcW5MCCHNhODnaPvwV5sCAPFuTBgjxY"
        "kAcL8mBBHizIgwV5sCAPFowLFuTAghxYkAMLcmBBDizIgQU5sCAHFuTAdnLwj+Mf5MGCPFiQBwvyYEEeLMiD7eRh"
        "aftpLy73+fpmMfgLb6fPf1i9/269erW+3pxOk5DyfDNfEV5dbs7fP0unad/Xf4CPMbz+s154nkJt02n+5P2jXf9N"
        "b+Vg13+HbZZPXnz/4+l80E8353+uzyylY+ufd1+8e/vTm8uff9ucjfV4e4vL168365szHFvd3eKPm/XGhdvWz+L6"
        "VVy/i+uPd6xfbuOFukFWN6jqBl3dQIU2FdpUaFOhTYU2FTqr0FmFzip0VqGzCl1U6KJCFxW6qNBFha4qdFWhqwpd"
        "VeiqQjcVuqnQTYVuKnRTobsK3VXorkJ3Fbqr0IMKPajQgwo9qNCDCj2q0KMKParQowo93gVdbxvYE+QtsrxFlbfo"
        "8hYyOWRyyOSQySGTQyY3mdxkcpPJTSY3mTzL5FkmzzJ5lsmzTF5k8iKTF5m8yORFJq8yeZXJq0xeZfIqkzeZvMnk"
        "TSZvMnmTybtM3mXyLpN3mbzL5INMPsjkg0w+yOR3Td+WW7EHaf/93d4HfP/HuvG51jRtKPnoJC33f5fnP0s77PMf"
        "7D3/0wVV+Zh/WGt8/pPT8vzny3z+k9uWtHq7Ptv9yBzXvHUj4+3q6gxP8TRPS52WPi3jtMA74b3wbng/XDAXzAVz"
        "wVwwFzLLuJBdyC5kF4oLxYXiQnGhuFBdqNyzC9WF6kJzobnQXGguNBe6C92FzjfrQndhcGFwYXBhcGFwYXRhdGF0"
        "YSQfARMJExETGRMh04xPdTZgdmC2gB6AJoAugDbA/uJPqnn2jiq9AM0A3QDtAP0ADQEdAS0BPUGdjadKW0BfQGNA"
        "Z0BrQG9Ac0B3QHvQ56NGlQ6BFoEegSaBLsFtWqZ4X+T5f8rpS8b02/M3670MAf9+/tca+6ePYKrL/G+Z/y3twPM/"
        "7P/7P/N3ej/kfxqybP7+zzL/e5z5n21P1H69vPbbN9u95xdTb7p35jd9WHYmjtfr1ZtPc8olbP/L8f/hp4B78m+f"
        "jf+p9zKP/30Z/x+jTRd0mF55WvyvPi2j93gnvBdcwfvhgrlgLpgL5oK5kFnGhexCdiG7UFwoLhQXigvFhepC5Z5d"
        "qC5UF5oLzYXmQnOhudBd6C50vlkXuguDC4MLgwuDC4MLowujCwQdyUfARMJExETGRMg041OdDZgdmC2gB6AJoAug"
        "DaAPoBHIs3dU6QVoBugGaAfoB2gI6AhoCegJ6mw8VdoC+gIaAzoDWgN6A5oDugPagz4fNap0CLQI9Ag0CXQJtGk5"
        "D36tbZn/f91tfbH/Qe2++X9K5eP/f/fO7/+nao86/h/y/78P2/4G3UDGOQ=="
    )),
    # an xattr name with a NUL: os.setxattr's ValueError escaped apply_tar
    "pax-nul-xattr-name": _pax_nul_xattr(),
    # corrupt gzip: isal's IsalError ("Invalid lookback distance") escaped the engine
    "gzip-invalid-lookback": base64.b64decode(
    "H4sIAAAAAAACA+3Y3QqCMBgG4B13FUbnus39gHdjP6QnrpxWl98YnVRERG0Zvo/IRIWJL9/H2KZfZSQw6mgp/ejc"
    "j/6aCcmF1lT4+0oqThJJIhhsX3ZuSjFNG5f/vrT2tA6bvxLief4sv82f+ccJRf7Bdcb0xbmgBZ0RmJ5l3Qaf42X9"
    "P/R/rbUgCR9sl4X+wInX//UXZ7b6Xf6MP+bPFPp/DIv5dw901P9b/zV1uxtV/2dMcFf/LMbiFOv/LD1VqWnW48nf"
    "9X/3Ovp/BMey8/n70+wP46h/KmWO/GPl35ht0D2g9/d/dK4o9n8AAAAAAAAAAAAAPnEBkNyllQAoAAA="
    ),
}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["GRAPHDRIVER_FUZZ_TMP"] = str(tmp)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    return env


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TARGET), *args], cwd=cwd, env=_env(cwd),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _uncaught(output: str) -> str:
    m = re.search(r"=== Uncaught Python exception: ===\n(.*)", output)
    return m.group(1) if m else output[-2000:]


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzz_regression_inputs(name: str, tmp_path: Path) -> None:
    case = tmp_path / name
    case.write_bytes(REGRESSIONS[name])
    res = _run([str(case)], tmp_path, 120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{name}: {_uncaught(out)}"


def test_fuzz_target_bounded_run(tmp_path: Path) -> None:
    seconds = int(os.environ.get("GRAPHDRIVER_FUZZ_SECONDS", "30"))
    corpus = tmp_path / "corpus"
    seeds = _run(["--write-seeds", str(corpus)], tmp_path, 120)
    assert seeds.returncode == 0, seeds.stderr
    assert len(list(corpus.iterdir())) >= 5
    res = _run([str(corpus), f"-max_total_time={seconds}", "-max_len=16384", "-seed=1",
                "-rss_limit_mb=1024", "-timeout=20", f"-artifact_prefix={tmp_path}/"],
               tmp_path, seconds + 300)
    out = res.stdout + res.stderr
    done = re.findall(r"Done (\d+) runs", out)
    print(f"\nfuzz smoke: {done[-1] if done else '?'} runs in {seconds}s; rc={res.returncode}")
    if res.returncode != 0:
        crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
        sample = crashes[0].read_bytes()[:64] if crashes else b""
        raise AssertionError(f"fuzz target failed: {_uncaught(out)} (input starts {sample!r}; "
                             "add it to REGRESSIONS)")
    assert done and int(done[-1]) > 100, out[-2000:]
