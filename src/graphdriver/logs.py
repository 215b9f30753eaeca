"""Loggers that import :mod:`logging` only when a message is logged (start-up time).

``log = logs.get_logger(__name__)`` stands for ``logging.getLogger(__name__)``: the first
attribute looked up (``log.warning``, ...) imports logging and hands over the real logger's
attribute; a ``debug`` or ``info`` message while logging is not loaded at all is dropped (nobody
can have asked for it: levels and handlers are set through logging).  The confined child's
imports (:mod:`graphdriver.archive.confine`), the store, the drivers and the command log
through these, so a command or a job that logs nothing never loads logging; the command and the
child set :data:`on_first_use` to configure logging the moment it is needed.  A message logged
where logging cannot be imported any more (the child after its chroot: the library is out of
reach) is written to stderr as logging's default format would, at :data:`fallback_level` and
above.

A leaf: imports nothing of graphdriver, and logging only lazily.
"""

from __future__ import annotations

import sys

from . import TYPE_CHECKING

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

#: called once, right after logging is first imported through a lazy logger (None: nothing)
on_first_use: Callable[[], None] | None = None
#: the level of the messages written when logging cannot be imported (logging.WARNING)
fallback_level = 30


class LazyLogger:
    """A stand-in for ``logging.getLogger(name)`` that imports logging on first use."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: logging.Logger | None = None

    def _resolve(self) -> logging.Logger:
        if self._logger is None:
            global on_first_use
            try:
                import logging
            except ImportError:  # chrooted: nothing can be imported any more
                return _StderrLogger(self._name)  # type: ignore[return-value]

            setup, on_first_use = on_first_use, None
            if setup is not None:
                setup()
            self._logger = logging.getLogger(self._name)
        return self._logger

    def __getattr__(self, attr: str) -> object:
        if attr in _QUIET and self._logger is None and "logging" not in sys.modules \
                and fallback_level > _QUIET[attr]:
            # nobody loaded logging, so nobody set a level or a handler below WARNING: the
            # message would go nowhere (logging's last resort shows WARNING and up)
            return _drop
        return getattr(self._resolve(), attr)


#: levels of the calls a lazy logger may drop while logging is not loaded
_QUIET = {"debug": 10, "info": 20}


def _drop(msg: str, *args: object, **kwargs: object) -> None:
    pass


class _StderrLogger:
    """What a lazy logger does where logging cannot be imported: ``LEVEL:name:message`` lines
    on stderr (logging.basicConfig's format), from :data:`fallback_level` up."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _emit(self, level: int, label: str, msg: str, args: tuple[object, ...]) -> None:
        if level >= fallback_level:
            sys.stderr.write(f"{label}:{self._name}:{msg % args if args else msg}\n")

    def debug(self, msg: str, *args: object) -> None:
        self._emit(10, "DEBUG", msg, args)

    def info(self, msg: str, *args: object) -> None:
        self._emit(20, "INFO", msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._emit(30, "WARNING", msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._emit(40, "ERROR", msg, args)


def get_logger(name: str) -> logging.Logger:
    """The logger *name*, imported when first used (typed as the real thing)."""
    return LazyLogger(name)  # type: ignore[return-value]
