"""Run a layer apply in a confined child process (DESIGN.md rule 2).

The parent spawns ``python -m graphdriver.archive.isolate`` by exec (never a bare fork), hands
it the input file descriptor itself (``pass_fds``: no copy through the parent) and a pipe for
results.  The child imports and warms up everything it needs (isal, zstandard, lzma, bz2,
hashlib, json, openat2), then, as root, chroots into the target and applies there; when not root
it skips the chroot (logged at debug level) and relies on dir-fd resolution alone.

Messages from the child are JSON lines on the result pipe: ``{"progress": n}`` now and then,
then ``{"ok": {"size": .., "diff_id": ..}}`` or ``{"error": {"class": .., "message": ..}}``; the
parent re-raises the same :mod:`graphdriver.errors` class with the same one-line message.

A recorder (tar-split, issue 6) works across the boundary: the child writes every recorder call
as a frame on a second pipe, and a thread in the parent replays the frames into
``opts.recorder`` (see :func:`replay_recorder_stream`).  A frame is ``b"S"`` + u32 length +
raw bytes for ``segment()``, or ``b"F"`` + u32 name length + u64 size + i64 crc64 (-1: none) +
name for ``file()``, or ``b"C"`` + u64 crc64 for ``file_done()`` (the CRC-64 of the entry's data,
computed by the child's tar reader as the data goes by; passed on when the recorder has a
``file_done`` method, dropped otherwise).  ``opts.tarsplit_fd``, when set and no recorder is
given, receives that frame stream directly.

If the child dies without a result (SIGKILL, OOM), an empty target is emptied by the parent
(GraphDriverError), while a non-empty one cannot be rolled back: ``StoreCorrupt`` is raised, and
the caller must keep the layer incomplete.

SIGINT or SIGTERM to the parent (while it runs ``apply_confined`` in the main thread) stops the
child, which rolls the target back; the parent then raises :class:`~graphdriver.errors.Interrupted`.
The child also gets SIGTERM if the parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import struct
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import errors
from ..errors import GraphDriverError, Interrupted
from ..idmap import IDMap
from .apply import ApplyOptions, ApplyResult
from .tarstream import Recorder

if TYPE_CHECKING:  # the parent's modules: the child does not import them (start-up time)
    import subprocess
    import threading
    from pathlib import Path

log = logging.getLogger(__name__)

_SEG = b"S"
_FILE = b"F"
_CRC = b"C"
_CRC_FRAME = struct.Struct("<cQ")
_U64 = struct.Struct("<Q")
_REPLAY_BUFFER = 1 << 20
_REPLAY_MIN = 64 << 10
#: the recorder pipe's capacity: the child's 1 MiB flushes go in without waiting for the parent
_PIPE_SIZE = 4 << 20
_SEG_HDR = struct.Struct("<I")
_FILE_HDR = struct.Struct("<IQq")


class PipeRecorder:
    """A Recorder that frames its calls onto a file descriptor (the child's side)."""

    def __init__(self, fd: int) -> None:
        self._out: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)

    def segment(self, raw: bytes) -> None:
        self._out.write(_SEG + _SEG_HDR.pack(len(raw)))
        self._out.write(raw)

    def file(self, name: bytes, size: int, payload_crc64: int | None) -> None:
        crc = -1 if payload_crc64 is None else payload_crc64
        self._out.write(_FILE + _FILE_HDR.pack(len(name), size, crc) + name)

    def file_done(self, crc64: int) -> None:
        self._out.write(_CRC_FRAME.pack(_CRC, crc64))

    def write_frames(self, frames: bytes) -> None:
        """Frames already encoded (by the native apply of a run of files, _fastapply.files)."""
        self._out.write(frames)

    def close(self) -> None:
        self._out.close()


#: names for messages, looked up without the enum machinery (it runs in signal handlers)
_SIGNAL_NAMES = {int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM"}


def _signame(signum: int) -> str:
    """"SIGINT", "SIGTERM": how a signal is named in messages."""
    return _SIGNAL_NAMES.get(signum) or f"signal {signum}"


def _corrupt(what: str) -> errors.InvalidArchive:
    return errors.InvalidArchive(f"recorder stream from the apply child is {what}")


def replay_recorder_stream(fd: int, recorder: Recorder) -> None:
    """Replay the frames of a :class:`PipeRecorder` read from *fd* (then closed) into *recorder*.

    Frames are parsed in place from one large buffer (they are many and small)."""
    file_done = getattr(recorder, "file_done", None)
    # a packer that turns the common frames into its lines natively (TarSplitPacker.take_frames)
    take = getattr(recorder, "take_frames", None)
    segment = recorder.segment
    file = recorder.file
    seg_size, file_size, crc_size = _SEG_HDR.size, _FILE_HDR.size, _U64.size
    seg_hdr, file_hdr, u64 = _SEG_HDR.unpack_from, _FILE_HDR.unpack_from, _U64.unpack_from
    buf = bytearray(_REPLAY_BUFFER)
    start = end = 0
    eof = False
    with open(fd, "rb", buffering=0) as f:
        while True:
            avail = end - start
            # make room for at least one more read; keep an unfinished frame at the front
            if eof:
                if not avail:
                    return
            else:
                if start and (avail < _REPLAY_MIN or end == len(buf)):
                    buf[:avail] = buf[start:end]
                    start, end = 0, avail
                if end < len(buf):
                    n = f.readinto(memoryview(buf)[end:])
                    if n:
                        end += n
                    else:
                        eof = True
                    avail = end - start
            progressed = False
            while avail:
                if take is not None:
                    took = take(buf, start, end)
                    if took:
                        start += took
                        avail -= took
                        progressed = True
                        continue
                kind = buf[start]
                if kind == 0x53:  # "S"
                    if avail < 1 + seg_size:
                        break
                    (n,) = seg_hdr(buf, start + 1)
                    total = 1 + seg_size + n
                    if total > avail:
                        if total > len(buf):
                            buf.extend(bytes(total - len(buf)))
                        break
                    segment(bytes(buf[start + 1 + seg_size : start + total]))
                elif kind == 0x46:  # "F"
                    if avail < 1 + file_size:
                        break
                    n, size, crc = file_hdr(buf, start + 1)
                    total = 1 + file_size + n
                    if total > avail:
                        if total > len(buf):
                            buf.extend(bytes(total - len(buf)))
                        break
                    name = bytes(buf[start + 1 + file_size : start + total])
                    file(name, size, None if crc < 0 else crc)
                elif kind == 0x43:  # "C"
                    total = 1 + crc_size
                    if total > avail:
                        break
                    if file_done is not None:
                        file_done(u64(buf, start + 1)[0])
                else:
                    raise _corrupt("corrupt")
                start += total
                avail -= total
                progressed = True
            if eof and avail and not progressed:
                raise _corrupt("truncated")


def _grow_pipe(fd: int) -> None:
    import fcntl

    for size in (_PIPE_SIZE, 1 << 20):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


def _error_class(name: str) -> type[GraphDriverError]:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, GraphDriverError):
        return cls
    return GraphDriverError


def _child_env() -> dict[str, str]:
    """The child runs with ``-S`` (no site: no .pth files, e.g. certifi's, at every apply), so
    its import path is spelled out: this package's root, then the parent's own path (which holds
    site-packages for isal and zstandard)."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    paths = [pkg_root]
    for p in sys.path:
        if p and os.path.isabs(p) and p not in paths and os.path.isdir(p):
            paths.append(p)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _empty_dir(target: Path) -> None:
    """Remove everything beneath *target* (never following symlinks)."""
    import shutil

    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for name, is_dir in entries:
            if is_dir:
                shutil.rmtree(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def apply_confined(source_fd: int, target: Path, opts: ApplyOptions) -> ApplyResult:
    """Apply the (possibly compressed) tar read from *source_fd* onto *target* in a child."""
    import subprocess
    import threading

    with os.scandir(target) as it:
        was_empty = next(it, None) is None
    # a duplicate of the same open file (shared offset): the child's stdio may not clobber it
    source_fd = os.dup(source_fd)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    rec_r = rec_w = -1
    replay: threading.Thread | None = None
    replay_error: list[BaseException] = []
    if opts.recorder is not None:
        rec_r, rec_w = os.pipe2(os.O_CLOEXEC)
        _grow_pipe(rec_w)
    elif opts.tarsplit_fd is not None:
        rec_w = opts.tarsplit_fd
    args = {
        "source_fd": source_fd,
        "result_fd": res_w,
        "recorder_fd": rec_w if rec_w >= 0 else None,
        "target": os.fspath(target),
        "whiteout_format": opts.whiteout_format,
        "idmap": opts.idmap.to_json(),
        "progress": opts.progress is not None,
        "log_level": logging.getLogger("graphdriver").getEffectiveLevel(),
    }
    pass_fds = [source_fd, res_w] + ([rec_w] if rec_w >= 0 else [])
    old_handlers: dict[signal.Signals, Any] = {}
    in_main = threading.current_thread() is threading.main_thread()
    proc: subprocess.Popen[bytes] | None = None

    signals: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        # Do not raise here: the child is told to stop, and its answer says what happened — it
        # rolled back (an Interrupted error comes back), or it had already finished, in which
        # case the apply stands (raising now would call a complete apply rolled back).
        signals.append(signum)
        if proc is None:
            raise Interrupted(f"interrupted by {_signame(signum)} before the apply started")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    try:
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, _on_signal)
        proc = subprocess.Popen(
            [sys.executable, "-S", "-m", "graphdriver.archive.isolate", json.dumps(args)],
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
            close_fds=True,
        )
        if signals:  # arrived while the child was being spawned
            proc.send_signal(signal.SIGTERM)
        os.close(res_w)
        res_w = -1
        if rec_r >= 0:
            os.close(rec_w)
            rec_w = -1
            recorder = opts.recorder
            assert recorder is not None
            fd = rec_r
            rec_r = -1

            def _replay() -> None:
                try:
                    replay_recorder_stream(fd, recorder)
                except BaseException as exc:  # reported after the child is done
                    replay_error.append(exc)

            replay = threading.Thread(target=_replay, name="recorder-replay", daemon=True)
            replay.start()
        outcome: dict[str, Any] | None = None
        with os.fdopen(res_r, "rb") as results:
            res_r = -1
            for line in results:
                msg = json.loads(line)
                if "progress" in msg:
                    if opts.progress is not None:
                        opts.progress(int(msg["progress"]))
                    continue
                outcome = msg
        rc = proc.wait()
        if replay is not None:
            replay.join()
        if outcome is None and signals and rc == -signal.SIGTERM:
            # Our SIGTERM killed the child before it had installed its handlers, which it does
            # before it touches the target: nothing was applied.
            raise Interrupted(f"interrupted by {_signame(signals[0])}; nothing was applied")
        if outcome is None:
            why = f"signal {-rc}" if rc < 0 else f"status {rc}"
            if was_empty:
                _empty_dir(target)  # the child could not roll back; an empty target is easy
                raise GraphDriverError(
                    f"the apply child exited with {why} without a result; the target was emptied"
                )
            # no rollback was possible: a distinct class, so the caller keeps the layer incomplete
            raise errors.StoreCorrupt(
                f"the apply child exited with {why} without a result; the target may be partly "
                "applied"
            )
        if "error" in outcome:
            err = outcome["error"]
            if err["class"] == "Interrupted" and signals:
                # the child always gets SIGTERM; say which signal the user sent
                raise Interrupted(f"interrupted by {_signame(signals[0])}; the apply was rolled "
                                  "back")
            raise _error_class(str(err["class"]))(str(err["message"]))
        if replay_error:
            exc = replay_error[0]
            if isinstance(exc, GraphDriverError):
                raise exc
            raise GraphDriverError(f"recorder failed: {exc}")
        ok = outcome["ok"]
        if signals:
            log.warning("%s arrived after the apply had finished; the apply stands",
                        _signame(signals[0]))
        return ApplyResult(int(ok["size"]), str(ok["diff_id"]))
    except BaseException as exc:
        if proc is not None and proc.poll() is None:
            log.debug("stopping the apply child %d after %r", proc.pid, exc)
            proc.send_signal(signal.SIGTERM)  # the child rolls back, then exits
            proc.wait()
            log.debug("apply child %d exited with %s", proc.pid, proc.returncode)
        raise
    finally:
        for fd in (res_r, res_w, rec_r, source_fd):
            if fd >= 0:
                os.close(fd)
        if rec_w >= 0 and rec_w != opts.tarsplit_fd:
            os.close(rec_w)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


# ---- the child -----------------------------------------------------------------------------------
def warm_up(kind: str) -> None:
    """Import and exercise what the apply needs (the stream's decoder only) before the chroot
    takes the library files away."""
    import hashlib
    import io

    from . import compression, pathres

    pathres.have_openat2()
    hashlib.sha256(b"").hexdigest()
    blob = b""
    if kind == "gzip":
        from isal import igzip

        blob = igzip.compress(b"x")
    elif kind == "zstd":
        import zstandard

        blob = zstandard.ZstdCompressor().compress(b"x")
    elif kind == "xz":
        import lzma

        blob = lzma.compress(b"x")
    elif kind == "bzip2":
        import bz2

        blob = bz2.compress(b"x")
    if blob:
        with compression.decompress_stream(io.BytesIO(blob)) as s:
            s.read()


def _set_pdeathsig() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - best effort
        pass


def _child_main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    res = os.fdopen(int(args["result_fd"]), "w", buffering=1)
    logging.basicConfig(level=int(args.get("log_level", logging.WARNING)), stream=sys.stderr)

    def send(msg: dict[str, Any]) -> None:
        # the parent may be gone (killed): the rollback has happened, nothing left to tell
        with contextlib.suppress(OSError, ValueError):
            res.write(json.dumps(msg) + "\n")

    def on_term(signum: int, frame: object) -> None:
        # Through the apply's gate: never between creating a path and journalling it.
        from .apply import SIGNAL_GATE

        SIGNAL_GATE.interrupt(
            Interrupted(f"interrupted by {_signame(signum)}; the apply was rolled back"))

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    _set_pdeathsig()
    if os.getppid() == 1:
        return 1
    recorder: PipeRecorder | None = None
    try:
        from . import apply as apply_mod
        from .compression import open_decompressed, stream_kind
        from .tarstream import TarReader

        # the decoder is chosen (and imported) before the chroot, from the stream's first bytes
        stream = open_decompressed(int(args["source_fd"]))
        warm_up(stream_kind(stream))
        if args.get("recorder_fd") is not None:
            from .tarstream import crc64_function

            crc64_function()  # anycrc is imported before the chroot
        target = args["target"]
        if os.geteuid() == 0:
            os.chdir(target)
            os.chroot(".")
            root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            apply_mod.allow_chdir = True
        else:
            log.debug("apply child not root: no chroot, relying on dir-fd resolution")
            root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if args.get("recorder_fd") is not None:
            recorder = PipeRecorder(int(args["recorder_fd"]))
        opts = ApplyOptions(
            whiteout_format=args["whiteout_format"],
            idmap=IDMap.from_json(args["idmap"]),
            recorder=recorder,
            progress=(lambda n: send({"progress": n})) if args.get("progress") else None,
        )
        reader = TarReader(stream, recorder)
        result = apply_mod.apply_reader(reader, root_fd, opts)
        if recorder is not None:
            recorder.close()
            recorder = None
        send({"ok": {"size": result.size, "diff_id": result.diff_id}})
    except GraphDriverError as exc:
        send({"error": {"class": type(exc).__name__, "message": str(exc)}})
    except KeyboardInterrupt:
        msg = "interrupted; the apply was rolled back"
        send({"error": {"class": "Interrupted", "message": msg}})
    except OSError as exc:
        err = errors.from_oserror(exc, "apply layer")
        send({"error": {"class": type(err).__name__, "message": str(err)}})
    except Exception as exc:
        send({"error": {"class": "GraphDriverError", "message": f"apply failed: {exc!r}"}})
    finally:
        if recorder is not None:
            with contextlib.suppress(OSError):
                recorder.close()
        with contextlib.suppress(OSError, ValueError):
            res.close()
    return 0


if __name__ == "__main__":
    _status = _child_main(sys.argv[1:])
    # Nothing is left to do: the result is sent, every file closed.  Skipping the interpreter's
    # finalization (tens of ms for a big apply's objects) lets the parent go on sooner.
    sys.stderr.flush()
    os._exit(_status)
