"""Our log lines, and what the libraries write to stderr on their own.

Every line the daemon and its decode workers put on stderr is a log record in one format:
`2024-05-01 12:00:00,000 INFO daemon.service: message`, or under systemd's journal
`<6>daemon.service: message`. Libraries that write to file descriptor 2 themselves --
TensorFlow's C++ start-up lines (absl logs them before anything could set its level, so
TF_CPP_MIN_LOG_LEVEL does not reach them), libpng's warnings and errors about a file --
are caught where they speak, around the import and around each decode, and logged here;
Python warnings (Keras's) become WARNING records.

A record's name is its module's name as it was before daemon/ had subpackages
(`daemon.service`, `daemon.watch`, `daemon.images`, not `daemon.service.service`...): the
names users already filter the journal on and the README quotes. Each module names its
logger so, explicitly.
"""

import contextlib
import logging
import os
import re
import sys
import threading
import warnings

from daemon.service.systemd import JournalFormatter, stderr_is_journal

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# glog/absl: "I0000 00:00:1716000000.123456    3865 port.cc:153] text"
NATIVE = re.compile(r"([IWEF])\d{4} [\d:.]+ +\d+ ([^\]]+)\] ?(.*)")
NATIVE_LEVELS = {"I": logging.DEBUG, "W": logging.WARNING, "E": logging.ERROR,
                 "F": logging.CRITICAL}
# absl's notice that it has no log file yet: about absl, not about us
ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"

log = logging.getLogger("daemon.logs")  # the name users see: daemon.service.logs

_capturing = threading.Lock()  # file descriptor 2 is one per process
_buffer = None  # the memfd that stands in for fd 2 during a capture, made once


def setup(level=logging.INFO):
    """Log records to stderr in our format (journald's under systemd); Python warnings too.
    The handler writes to its own copy of fd 2, so a capture never takes our own lines."""
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, errors="backslashreplace")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if stderr_is_journal() else logging.Formatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    warnings.showwarning = _log_warning
    threading.excepthook = _log_thread_exception


def _log_thread_exception(args):
    # A library's thread that dies (concurrent.futures' pool manager, racing a killed
    # worker) would print its traceback raw; ours never end this way (daemon.service.service
    # keeps them)
    if args.exc_type is not SystemExit:
        log.error("thread %s ended: %s", args.thread.name if args.thread else "?",
                  args.exc_value, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_warning(message, category, filename, lineno, file=None, line=None):
    # one line, unlike warnings.formatwarning's (it adds the source line below)
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message,
                                             filename, lineno)


def uncaptured():
    """Hold this while starting a process: it inherits fd 2, which must then be the real
    stderr, not a capture's stand-in."""
    return _capturing


def import_tensorflow():
    """Import TensorFlow and Keras with their C++ start-up lines logged: TensorFlow's INFO
    as DEBUG, its warnings and errors as such. TF_CPP_MIN_LOG_LEVEL=3 (unless set) keeps
    the rest of its C++ logging to fatal errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with captured(log, logging.WARNING, "tensorflow "):
        import keras  # noqa: F401
        import tensorflow  # noqa: F401


@contextlib.contextmanager
def captured(logger, level, prefix="", highest=logging.CRITICAL):
    """Within: what native code writes to fd 2 is kept, then logged by `logger`, a record a
    line, at the line's own glog severity (at most `highest`) or else `level`, after
    `prefix`."""
    global _buffer
    with _capturing:
        if _buffer is None:
            _buffer = os.memfd_create("stderr", os.MFD_CLOEXEC)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(_buffer, 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            written = os.lseek(_buffer, 0, os.SEEK_CUR)
            if written:
                text = os.pread(_buffer, written, 0).decode(errors="replace")
                os.ftruncate(_buffer, 0)
                os.lseek(_buffer, 0, os.SEEK_SET)
                _log_lines(logger, level, prefix, text, highest)


def _log_lines(logger, level, prefix, text, highest):
    for line in text.splitlines():
        if not line.strip():
            continue
        native = NATIVE.match(line)
        if native:  # a continuation line keeps the level of the line it continues
            level = min(NATIVE_LEVELS[native.group(1)], highest)
            line = f"{native.group(2)}: {native.group(3)}"
        logger.log(logging.DEBUG if line.startswith(ABSL_NOTICE) else level, "%s%s", prefix,
                   line)
