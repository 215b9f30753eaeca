"""The runner of confined jobs: one child process per job, exec'd, chrooted, answering on a pipe.

Every piece of work that reads an untrusted layer stream and writes a layer (apply a Linux layer:
:mod:`.isolate`; import a Windows layer: :mod:`.winimport`; anything later) runs as a *job* of
this runner (DESIGN.md rule 2; moby's ``reexec`` + chrootarchive's ``goInChroot``).

A job is a function ``job(ctx: ChildContext) -> Callable[[], dict]`` named ``"module:function"``
(any module the child can import; graphdriver's jobs live in ``graphdriver.archive``).  The child
imports that module, then calls the function *before* it confines itself: there the job reads
its parameters, opens its input and imports and warms up everything it will need (the library
files are out of reach after the chroot).  The function returns the job's body, which the
runner calls once confined; the body's dict is the result handed back to the parent.  A job's
module may define ``preload()``: a child started ahead of its job calls it while it waits, to
import and warm what every run of the module's jobs needs (the parent meanwhile prepares).

The parent (:func:`run_job`):

- spawns ``python -S -P -c CHILD_MAIN`` with ``posix_spawn`` (never a fork of a threaded
  process; no subprocess module: its import is start-up time), with the file descriptors
  themselves (dup2'd to numbers above every passed one, so no flag of the parent's is touched
  and no other thread's child can inherit them; the child closes any other it inherited, as
  ``close_fds`` would), no copy through the parent: the input stream, the
  target directory, the result pipe, the recorder frame pipe (:mod:`.recframes`) and the
  directories of the parent chain ("lowers"), the job's name and its parameters (``marshal``'d,
  in hex: the child reads them without json);
- or hands them to a child started earlier (a :class:`Prespawned`): the store starts the
  apply's child first thing in an apply (:func:`start_child`), a command before it opens its
  store (:func:`prespawn`), so that the child's start-up and its job module's imports overlap
  the parent's work (locks, records, markers); that child imported the job's module and waits
  on a unix socket; the same parameters and file descriptors reach it in one message
  (``SCM_RIGHTS``).  A child nobody takes (the apply was refused) is stopped and reaped at once
  (:meth:`Prespawned.discard`, :func:`discard_prespawned`) before it was handed anything.
  No child is started ahead of a job that is not about to run, nor kept idle;
- opens the lowers read-only: as root each is a detached read-only clone of its mount
  (:func:`graphdriver.mount.read_only_view`: writes through it fail with EROFS); without the
  privilege, a plain ``O_RDONLY`` directory fd.  A job that must hard-link the lowers' files
  into its target (hcsshim's import) asks for ``lowers_linkable``: link(2) cannot cross mounts,
  so those are plain directory fds of the layers' own mount;
- forwards SIGINT/SIGTERM (while it runs in the main thread) to the child as SIGTERM, which
  makes the job roll back; the parent then raises :class:`~graphdriver.errors.Interrupted`;
- reports the child's progress messages to the caller's callback;
- returns the job's result, or re-raises the same :mod:`graphdriver.errors` class with the same
  one-line message; a child that dies without an answer is reported by the caller's ``on_death``.

The child sets ``PR_SET_PDEATHSIG`` (SIGTERM: it rolls back if the parent dies) and checks the
parent it was spawned by is still there.  A signal that comes while the job prepares is held
until it is done and then stops the job before its body starts (an exception raised inside the
import of an extension module crashed the child with SIGSEGV).  As root it chroots into the
target and refuses to run the job when the chroot fails (an error, never a quiet fallback); when
not root it relies on dir-fd resolution (every path beneath the target fd, :mod:`.pathres`).

Messages from the child are JSON lines on the result pipe: ``{"progress": n}`` now and then,
then ``{"ok": {...}}`` or ``{"error": {"class": .., "message": ..}}``; the child writes them with
:mod:`.jsontext`, the parent reads them with json (a child's answer is data, never code).

The child starts once per layer, so it imports only what a job needs (issue 18;
``tests/test_startup.py`` checks it): no runpy (``-c``, not ``-m``), no json, re, typing,
enum (``_signal``), inspect, dataclasses or pathlib, and logging only if a message is logged
(:mod:`graphdriver.logs`).  After the chroot nothing can be imported any more: what the body
needs is imported while the job prepares.

Owns the process boundary.  Imports :mod:`graphdriver.errors`, :mod:`graphdriver.logs`,
:mod:`.native` (a leaf: the job's module is imported by name with its ``import_module``);
:mod:`.recframes` and :mod:`.pipes` when a job records through the frame pipe, :mod:`.jsontext`
in the child; the parent side imports :mod:`graphdriver.mount` (read-only views) when it has
lowers (what comes before a child's start is kept light: it delays the start).  It never
imports a job module (the child does, by name), a driver, the store, the CLI, the plugin or the
package root.
"""

from __future__ import annotations

import _thread
import errno
import gc
import marshal
import os
import sys

from .. import errors, logs
from ..errors import GraphDriverError, Interrupted
from ..logs import get_logger
from .native import import_module, native_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:  # the parent's modules: the child does not import them (start-up time)
    import signal
    import threading
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from typing import Any

    from .recframes import PipeRecorder
    from .tarstream import Recorder
else:
    import _signal as signal  # the same calls, without the enum wrappers (start-up time)

log = get_logger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

if TYPE_CHECKING:
    #: the body of a job, run once the child is confined; its dict is the job's result
    JobBody = Callable[[], dict[str, Any]]


#: the child's command line after ``python -S -P -c`` (no runpy: ``-m`` imports importlib.util and
#: contextlib); its arguments are the job's name (as ps shows it) and its parameters,
#: ``marshal``'d and hex-encoded.  The cyclic GC is off while it imports (the collections
#: its imports' allocations start were ~10% of them: 19.6 -> 17.6 ms to a preloaded child, medians
#: of 40), then on again, with everything imported frozen, when the job's body starts
CHILD_MAIN = ("import gc; gc.disable(); from graphdriver.archive.confine import child_main; "
              "child_main()")

#: the child's second argument when it was started ahead of its job (:func:`prespawn`): its
#: parameters come over the hand-over socket, whose fd and the parent's pid follow
_WAIT = "wait"

#: the largest hand-over message (marshal'd parameters) and fd count a waiting child accepts
_HANDOVER_BYTES = 1 << 20
_HANDOVER_FDS = 250

#: children :func:`prespawn` started ahead of their job, by job name (the command's: one per job)
_waiting: dict[str, Prespawned] = {}
#: guards :data:`_waiting` (a library user may apply from several threads)
_waiting_lock = _thread.allocate_lock()


def _parent_log_level() -> int:
    """graphdriver's log level here: WARNING while logging is not loaded (nobody set one)."""
    if "logging" not in sys.modules:
        return 30
    import logging

    return logging.getLogger("graphdriver").getEffectiveLevel()


def _error_class(name: str) -> type[GraphDriverError]:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, GraphDriverError):
        return cls
    return GraphDriverError


def _child_env() -> dict[str, str]:
    """The child runs with ``-S`` (no site: no .pth files, e.g. certifi's, at every job), so
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


def _open_lowers(lowers: Sequence[Path], linkable: bool) -> list[int]:
    fds: list[int] = []
    try:
        for path in lowers:
            fd = os.open(path, _DIR_FLAGS)
            if linkable or os.geteuid() != 0:
                fds.append(fd)
                continue
            from ..mount import read_only_view

            try:
                fds.append(read_only_view(fd))
            except OSError as exc:
                raise errors.from_oserror(
                    exc, f"opening {path} read-only for a confined job") from exc
            finally:
                os.close(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class _Process:
    """A spawned child: the part of ``subprocess.Popen`` the runner uses (pid, poll, wait,
    send_signal, kill), on ``os.waitpid``."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, options: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, options)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): as Popen says
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int:
        code = self._reap(0)
        assert code is not None
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # never a signal to a reaped (maybe reused) pid
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _child_fds(pass_fds: Sequence[int]) -> dict[int, int]:
    """The number each passed fd gets in the child: above every passed one (a dup2 never lands
    on a source still to be copied), at least 3."""
    first = max(3, max(pass_fds, default=2) + 1)
    return {fd: first + i for i, fd in enumerate(pass_fds)}


def _spawn(job: str, arguments: list[str], fds: dict[int, int]) -> _Process:
    """Start the child with the fds *fds* (parent's number -> child's), stdin /dev/null, an
    empty signal mask and SIGPIPE/SIGXFSZ at their defaults (as subprocess does)."""
    actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, src, dst)
                                      for src, dst in fds.items()]
    actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
    pid = os.posix_spawn(sys.executable,
                         [sys.executable, "-S", "-P", "-c", CHILD_MAIN, job, *arguments],
                         _child_env(), file_actions=actions, setsigmask=(),
                         setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    return _Process(pid)


def _renumber(args: dict[str, Any], fds: dict[int, int]) -> dict[str, Any]:
    """*args* with its fds as the child numbers them (*fds*: parent's number -> child's)."""
    args = dict(args)
    for key in _FD_KEYS:
        if args[key] is not None:
            args[key] = fds[args[key]]
    args["lower_fds"] = [fds[fd] for fd in args["lower_fds"]]
    return args


#: the parameters that name one fd (``lower_fds`` names several)
_FD_KEYS = ("input_fd", "target_fd", "result_fd", "frames_fd", "packer_fd", "digest_fd")


def _close_inherited(keep: Sequence[int]) -> None:
    """Close every fd above stderr but *keep*: what the child inherited beyond its own (an
    fd the parent's process left inheritable), as ``close_fds`` would before the exec."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class Prespawned:
    """A child started ahead of its job (:func:`start_child`, :func:`prespawn`): it started
    Python, imports the job's module and waits on a unix socket for the job's parameters and
    file descriptors.  :func:`run_job` hands it the job (``child=``); one nobody takes is stopped
    by :meth:`discard`.  The thread that starts it must outlive it (``PR_SET_PDEATHSIG`` is
    tied to the thread): the one that runs the job, or the command's main thread."""

    __slots__ = ("exiting", "job", "proc", "sock")

    def __init__(self, job: str, proc: _Process, sock: Any) -> None:
        self.job = job
        self.proc = proc
        #: the parent's end of the hand-over socket; None once the child was handed its job
        #: or discarded
        self.sock: Any = sock
        #: the child did its job and answered, and is exiting: :meth:`discard` reaps it
        self.exiting = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def discard(self) -> None:
        """Stop the child and reap it if it was handed nothing (it has touched nothing); reap
        it if it did its job and answered (:func:`run_job` leaves that to the caller, who
        commits meanwhile); else nothing (:func:`run_job` owns it)."""
        if self.exiting:
            self.exiting = False
            self.proc.wait()
            return
        sock, self.sock = self.sock, None
        if sock is None:
            return
        sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def hand_over(self, args: dict[str, Any],
                  pass_fds: list[int]) -> _Process | None:
        """Give *args* and *pass_fds* to the child (None: it could not take them, it is gone:
        it was stopped and reaped).  *args* names the fds by the parent's numbers; the child maps
        them to its own."""
        import _socket

        sock, self.sock = self.sock, None
        if sock is None:
            return None
        proc = self.proc
        message = marshal.dumps({**args, "passed": pass_fds})
        try:
            # more than one message holds (a deep parent chain's fds): a new child gets them
            if proc.poll() is None and len(message) <= _HANDOVER_BYTES \
                    and len(pass_fds) <= _HANDOVER_FDS:
                sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                          b"".join(fd.to_bytes(4, sys.byteorder, signed=True)
                                                   for fd in pass_fds))])
                return proc
        except OSError as exc:  # it died meanwhile (killed): a new child does the job
            log.debug("the waiting %s child %d could not take the job: %s", self.job, proc.pid,
                      exc)
        finally:
            sock.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        return None


def _start_waiting(job: str) -> Prespawned:
    import _socket

    ours, theirs = _socket.socketpair(_socket.AF_UNIX,
                                      _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        fds = _child_fds([theirs.fileno()])
        proc = _spawn(job, [_WAIT, str(fds[theirs.fileno()]), str(os.getpid())], fds)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Prespawned(job, proc, ours)


def start_child(job: str) -> Prespawned:
    """The child for the job *job* about to run in this thread: the command's waiting one
    (:func:`prespawn`), else one started now, so that its start-up overlaps the caller's
    preparation (the store calls it first thing in an apply).  The caller hands it to
    :func:`run_job` (``child=``) or, if the job does not run after all, calls its
    :meth:`~Prespawned.discard`.  It starts in this process's namespaces, where the job runs."""
    with _waiting_lock:
        waiting = _waiting.pop(job, None)
    if waiting is not None and waiting.proc.poll() is None:
        return waiting
    if waiting is not None:
        waiting.discard()  # it died (killed): reaped, and replaced
    return _start_waiting(job)


def prespawn(job: str) -> int:
    """Start the child of the job *job* now, for a command that will run the job once it has
    opened its store (:func:`start_child` takes it; the wait overlaps the open).  Call it after
    any namespace change (the child stays where it was started), from the thread that will
    run the job or outlives it.  A second call for the same job keeps the first child.  Returns
    its pid."""
    with _waiting_lock:
        if job not in _waiting:
            _waiting[job] = _start_waiting(job)
        return _waiting[job].pid


def discard_prespawned() -> None:
    """Stop every child :func:`prespawn` started that no job took (it was handed nothing: it has
    touched nothing), and reap it."""
    with _waiting_lock:
        waiting = list(_waiting.values())
        _waiting.clear()
    for child in waiting:
        child.discard()


def run_job(
    job: str,
    target: Path,
    params: dict[str, Any],
    *,
    on_death: Callable[[str], GraphDriverError],
    input_fd: int | None = None,
    lowers: Sequence[Path] = (),
    lowers_linkable: bool = False,
    recorder: Recorder | None = None,
    frames_fd: int | None = None,
    packer_fd: int | None = None,
    digest_fd: int | None = None,
    progress: Callable[[int], None] | None = None,
    child: Prespawned | None = None,
    on_started: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the job ``"module:function"`` confined to *target*; return its result.

    *input_fd* is handed to the child as it is (a duplicate sharing its offset); *lowers* are
    the parent chain's directories, nearest first (read-only, see the module docstring).  A
    *recorder* gets the calls of the child's ``ctx.recorder`` replayed in a thread; without one,
    *frames_fd* (if given) receives the frame stream itself.  *packer_fd* is handed to the child
    as it is, for the job to write into (``ctx.packer_fd``: the apply's tar-split lines), and
    *digest_fd* for the job to map (``ctx.digest_fd``: the hand-off page of the apply's input
    digest, see :mod:`.inputdigest`).
    *on_started* is called once the child has the job (the caller's work that should not delay
    the child).  *child* (:func:`start_child`) takes the job if it can, and once it answered
    success it is left exiting for the caller to reap (:meth:`Prespawned.discard`, after its
    commit: the child's answer comes after its last change and its fsync); without one, a child
    :func:`prespawn` started for *job* does, else a new one is spawned.  *on_death* makes the
    error raised when the child exits without an answer (given why: "signal 9", "status 1").
    """
    import json
    import threading

    fds_to_close: list[int] = []
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    fds_to_close += [res_r, res_w]
    rec_r = -1
    rec_w = frames_fd if recorder is None and frames_fd is not None else -1
    replay: threading.Thread | None = None
    replay_error: list[BaseException] = []
    old_handlers: dict[signal.Signals, Any] = {}
    in_main = threading.current_thread() is threading.main_thread()
    proc: _Process | None = None
    signals: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        # Do not raise here: the child is told to stop, and its answer says what happened — it
        # rolled back (an Interrupted error comes back), or it had already finished, in which
        # case the job's work stands (raising now would call a finished job rolled back).
        signals.append(signum)
        if proc is None:
            raise Interrupted(f"interrupted by {signame(signum)} before the {job} job started")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    try:
        # a duplicate of the same open file (shared offset): the child's stdio may not clobber it
        child_input = -1
        if input_fd is not None:
            child_input = os.dup(input_fd)
            fds_to_close.append(child_input)
        target_fd = os.open(target, _DIR_FLAGS)
        fds_to_close.append(target_fd)
        lower_fds = _open_lowers(lowers, lowers_linkable)
        fds_to_close += lower_fds
        if recorder is not None:
            rec_r, rec_w = os.pipe2(os.O_CLOEXEC)
            fds_to_close += [rec_r, rec_w]
            from .pipes import grow_pipe
            from .recframes import PIPE_SIZE

            grow_pipe(rec_w, PIPE_SIZE)
        args = {
            "params": params,
            "parent_pid": os.getpid(),
            "input_fd": child_input if child_input >= 0 else None,
            "target_fd": target_fd,
            "target": os.fspath(target),
            "result_fd": res_w,
            "frames_fd": rec_w if rec_w >= 0 else None,
            "packer_fd": packer_fd,
            "digest_fd": digest_fd,
            "lower_fds": lower_fds,
            "progress": progress is not None,
            "log_level": _parent_log_level(),
        }
        pass_fds = [fd for fd in (child_input, target_fd, res_w, rec_w,
                                  -1 if packer_fd is None else packer_fd,
                                  -1 if digest_fd is None else digest_fd) if fd >= 0] + lower_fds
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, _on_signal)
        if child is None:
            with _waiting_lock:
                waiting = _waiting.pop(job, None)
            proc = waiting.hand_over(args, pass_fds) if waiting is not None else None
        elif child.job != job:
            child.discard()
            proc = None
        else:
            proc = child.hand_over(args, pass_fds)
        if proc is None:
            fds = _child_fds(pass_fds)
            proc = _spawn(job, [marshal.dumps(_renumber(args, fds)).hex()], fds)
        if signals:  # arrived while the child was being spawned
            proc.send_signal(signal.SIGTERM)
        # the child holds its own copies now; ours would keep the pipes from ending
        for fd in (res_w, rec_w if recorder is not None else -1, child_input, target_fd,
                   *lower_fds):
            if fd >= 0:
                os.close(fd)
                fds_to_close.remove(fd)
        if recorder is not None:
            fds_to_close.remove(rec_r)
            replay = _start_replay(rec_r, recorder, replay_error)
        if on_started is not None:
            on_started()
        outcome: dict[str, Any] | None = None
        fds_to_close.remove(res_r)
        with os.fdopen(res_r, "rb") as results:
            for line in results:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise GraphDriverError(f"the {job} child answered {line[:80]!r}")
                if "progress" in msg:
                    if progress is not None:
                        progress(int(msg["progress"]))
                    continue
                outcome = msg
        if outcome is not None and "ok" in outcome and child is not None \
                and proc is child.proc:
            child.exiting = True  # the caller reaps it (its exit overlaps the commit)
            rc = 0
        else:
            rc = proc.wait()
        if replay is not None:
            replay.join()
        if outcome is None and signals and rc == -signal.SIGTERM:
            # Our SIGTERM killed the child before it had installed its handlers, which it does
            # before it touches the target: nothing was done.
            raise Interrupted(f"interrupted by {signame(signals[0])}; nothing was done")
        if outcome is None:
            raise on_death(_death(rc))
        if "error" in outcome:
            err = outcome["error"]
            if err["class"] == "Interrupted" and signals:
                # the child always gets SIGTERM; say which signal the user sent
                raise Interrupted(f"interrupted by {signame(signals[0])}; the {job} job was "
                                  "rolled back")
            raise _error_class(str(err["class"]))(str(err["message"]))
        if replay_error:
            exc = replay_error[0]
            if isinstance(exc, GraphDriverError):
                raise exc
            raise GraphDriverError(f"recorder failed: {exc}")
        if signals:
            log.warning("%s arrived after the %s job had finished; its work stands",
                        signame(signals[0]), job)
        result: dict[str, Any] = outcome["ok"]
        return result
    except BaseException as exc:
        if proc is not None and proc.poll() is None:
            log.debug("stopping the %s child %d after %r", job, proc.pid, exc)
            proc.send_signal(signal.SIGTERM)  # the child rolls back, then exits
            proc.wait()
            log.debug("%s child %d exited with %s", job, proc.pid, proc.returncode)
        raise
    finally:
        if child is not None and not child.exiting:
            child.discard()  # not handed the job (it failed before): stopped, reaped
        for fd in fds_to_close:
            os.close(fd)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _start_replay(fd: int, recorder: Recorder,
                  replay_error: list[BaseException]) -> threading.Thread:
    import threading

    from .recframes import replay_recorder_stream

    def _replay() -> None:
        try:
            replay_recorder_stream(fd, recorder)
        except BaseException as exc:  # reported after the child is done
            replay_error.append(exc)

    thread = threading.Thread(target=_replay, name="recorder-replay", daemon=True)
    thread.start()
    return thread


# ---- the child -----------------------------------------------------------------------------------


#: names for messages, looked up without the enum machinery (it runs in signal handlers)
_SIGNAL_NAMES = {int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM"}


def _death(rc: int) -> str:
    """How a child that sent no answer ended (its exit status, as ``Popen.returncode``), for
    its caller's ``on_death``."""
    if rc >= 0:
        return f"status {rc}"
    if -rc == signal.SIGBUS:
        # a layer job maps an uncompressed input file (tarstream's _fill_mapped): the pages
        # past the file's new end are gone
        return "SIGBUS (its input file was cut shorter while it read it?)"
    return f"signal {-rc}"


def signame(signum: int) -> str:
    """"SIGINT", "SIGTERM": how a signal is named in messages."""
    return _SIGNAL_NAMES.get(signum) or f"signal {signum}"


def _raise(exc: Interrupted) -> None:
    raise exc


class ChildContext:
    """What a job gets in the child: its parameters and file descriptors, and the runner's
    services (progress, the recorder, the interrupt hook)."""

    def __init__(self, args: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
        self.params: dict[str, Any] = args["params"]
        #: the input stream as handed over by the parent (None: the job has no input)
        self.input_fd: int | None = args["input_fd"]
        #: the target directory; once confined as root, also the child's "/"
        self.target_fd: int = int(args["target_fd"])
        #: the parent chain's directories, nearest first, read-only unless the job asked for
        #: linkable ones
        self.lower_fds: list[int] = [int(fd) for fd in args["lower_fds"]]
        #: frames the job's recorder calls to the parent (None: no recording wanted)
        self.recorder: PipeRecorder | None = None
        if args["frames_fd"] is not None:
            from .recframes import PipeRecorder

            self.recorder = PipeRecorder(int(args["frames_fd"]))
        #: a file the parent handed over for the job to write into (the apply's tar-split
        #: lines), None when not asked for
        self.packer_fd: int | None = args.get("packer_fd")
        #: a page shared with the parent for the job to map (the apply's input digest's hand-off
        #: page: see :mod:`.inputdigest`), None when there is none
        self.digest_fd: int | None = args.get("digest_fd")
        #: whether the child is chrooted into the target (set when confined)
        self.chrooted = False
        #: what a SIGTERM/SIGINT does while the body runs: raise at once (the default), or a
        #: job's own gate (the apply's: never between a change and its journal).  While the job
        #: prepares (imports, warm-up) an interrupt waits: one raised inside the import of an
        #: extension module can crash the interpreter; it is raised before the body starts.
        self.on_interrupt: Callable[[Interrupted], None] = _raise
        self.preparing = True
        self.pending: Interrupted | None = None
        self._send = send
        self._want_progress = bool(args["progress"])

    @property
    def progress(self) -> Callable[[int], None] | None:
        """A callback sending progress to the parent, or None when nobody listens."""
        if not self._want_progress:
            return None
        send = self._send
        return lambda n: send({"progress": n})


def _set_pdeathsig() -> None:
    """SIGTERM when the parent's thread that spawned us ends: the native helper's prctl where it
    is built, else libc's through ctypes (a few ms of imports)."""
    fast = native_module("_fastapply")
    try:
        if fast is not None:
            fast.set_parent_death_signal(signal.SIGTERM)
            return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - best effort
        pass


def _load_job(name: str) -> Callable[[ChildContext], JobBody]:
    module, _, func = name.partition(":")
    if not module or not func:
        raise errors.InvalidArgument(f"not a confined job: {name!r}")
    job = getattr(import_module(module), func, None)
    if not callable(job):
        raise errors.InvalidArgument(f"not a confined job: {name!r}")
    return job  # type: ignore[no-any-return]


def _confine(ctx: ChildContext, target: str) -> None:
    """As root: chroot into the target, or fail.  Not root: dir-fd resolution only."""
    if os.geteuid() != 0:
        log.debug("confined child not root: no chroot, relying on dir-fd resolution")
        return
    try:
        os.fchdir(ctx.target_fd)
        os.chroot(".")
    except OSError as exc:
        cls = errors.PermissionDenied if exc.errno in (errno.EPERM, errno.EACCES) else \
            errors.NotSupported
        raise cls(f"the confined child cannot chroot into {target} ({exc.strerror}); refusing "
                  "to run unconfined") from exc
    ctx.chrooted = True


def child_main() -> None:
    """The confined child's entry point (:data:`CHILD_MAIN`)."""
    status = _child_main(sys.argv[1:])
    # Nothing is left to do: the result is sent, every file closed.  Skipping the interpreter's
    # finalization (tens of ms for a big job's objects) lets the parent go on sooner.
    sys.stderr.flush()
    os._exit(status)


def _receive(sock_fd: int) -> dict[str, Any] | None:
    """The parameters a :func:`prespawn`'ed child is handed, its fds renumbered as received
    (None: the parent closed the socket without a job)."""
    import _socket

    sock = _socket.socket(fileno=sock_fd)
    try:
        data, ancillary, flags, _ = sock.recvmsg(_HANDOVER_BYTES,
                                                 _socket.CMSG_SPACE(4 * _HANDOVER_FDS))
    finally:
        sock.close()
    received: list[int] = []
    for level, kind, fds in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            received += memoryview(fds)[:len(fds) - len(fds) % 4].cast("i").tolist()
    if not data:
        for fd in received:
            os.close(fd)
        return None
    if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
        raise errors.InvalidArgument("the confined job's parameters did not fit its message")
    args: dict[str, Any] = marshal.loads(data)
    return _renumber(args, dict(zip(args.pop("passed"), received, strict=True)))


def _child_main(argv: list[str]) -> int:
    from ..fsutil import reserve_fd_table
    from .jsontext import dumps as json_text

    # before any thread: a job's threads would otherwise all wait for an RCU grace period each
    # time the table grows (an apply's file writer holds up to 128 files open)
    reserve_fd_table()
    job = argv[0]
    ctx: ChildContext | None = None
    held: list[int] = []  # signals that came before the job's context existed

    def on_term(signum: int, frame: object) -> None:
        if ctx is None:
            held.append(signum)
            return
        exc = Interrupted(f"interrupted by {signame(signum)}; the {job} job was "
                          "rolled back")
        if ctx.preparing:
            ctx.pending = ctx.pending or exc
            return
        ctx.on_interrupt(exc)

    signal.signal(signal.SIGTERM, on_term)
    if argv[1] == _WAIT:  # started ahead of the job: import its module, then wait for it
        _close_inherited([int(argv[2])])
        # A SIGINT now is the terminal's, to the whole process group: the parent decides what it
        # means (it may be committing something else); once the job is handed over, the parent
        # forwards what stops the job as a SIGTERM.  A SIGTERM is held, as below.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _set_pdeathsig()
        if os.getppid() != int(argv[3]):
            return 1  # the parent died before PDEATHSIG was set
        try:
            preload = getattr(import_module(job.partition(":")[0]), "preload", None)
            if callable(preload):
                preload()
        except Exception:  # a failing import fails again below, answered
            pass
        received = _receive(int(argv[2]))
        if received is None:
            return 0  # not needed after all
        args = received
        signal.signal(signal.SIGINT, on_term)
    else:
        signal.signal(signal.SIGINT, on_term)
        args = marshal.loads(bytes.fromhex(argv[1]))
        _close_inherited([args[key] for key in _FD_KEYS if args[key] is not None]
                         + args["lower_fds"])
        _set_pdeathsig()
        if os.getppid() != int(args["parent_pid"]):
            return 1  # the parent died before PDEATHSIG was set: nobody waits for the answer
    res = os.fdopen(int(args["result_fd"]), "w", buffering=1)
    level = int(args.get("log_level", 30))
    logs.fallback_level = level
    if level < 30:  # below WARNING: configure logging now, the parent wants the details
        _configure_logging(level)
    else:  # logging is imported if a message comes before the chroot
        logs.on_first_use = lambda: _configure_logging(level)

    def send(msg: dict[str, Any]) -> None:
        try:
            res.write(json_text(msg) + "\n")
        except (OSError, ValueError):
            pass  # the parent may be gone (killed): the rollback has happened, nothing to tell

    ctx = ChildContext(args, send)
    if held:
        ctx.pending = Interrupted(f"interrupted by {signame(held[0])}; the {job} job was "
                                  "rolled back")
    try:
        body = _load_job(job)(ctx)
        _confine(ctx, str(args["target"]))
        ctx.preparing = False
        gc.freeze()  # what the imports made stays: the job's collections skip it
        gc.enable()
        if ctx.pending is not None:
            raise Interrupted(f"interrupted before the {job} job started; nothing was "
                              "done")
        result = body()
        if ctx.recorder is not None:
            ctx.recorder.close()
            ctx.recorder = None
        send({"ok": result})
    except GraphDriverError as exc:
        send({"error": {"class": type(exc).__name__, "message": str(exc)}})
    except KeyboardInterrupt:
        send({"error": {"class": "Interrupted",
                        "message": f"interrupted; the {job} job was rolled back"}})
    except OSError as exc:
        err = errors.from_oserror(exc, f"{job} job")
        send({"error": {"class": type(err).__name__, "message": str(err)}})
    except Exception as exc:
        send({"error": {"class": "GraphDriverError",
                        "message": f"{job} job failed: {exc!r}"}})
    finally:
        if ctx.recorder is not None:
            try:
                ctx.recorder.close()
            except OSError:
                pass
        try:
            res.close()
        except (OSError, ValueError):
            pass
    return 0


def _configure_logging(level: int) -> None:
    import logging

    logging.basicConfig(level=level, stream=sys.stderr)
