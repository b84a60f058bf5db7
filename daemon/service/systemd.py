"""systemd integration without libsystemd: sd_notify, journal-friendly logs, the unit file."""

import getpass
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from daemon.errors import ConfigError, WardrobeError
from daemon.service import addresses
from daemon.service.addresses import show_broker

log = logging.getLogger("daemon.systemd")  # the name users see: daemon.service.logs

# journald reads "<N>" at the start of a line as its priority (sd-daemon(3)).
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}


class Notifier:
    """sd_notify over $NOTIFY_SOCKET (a path or an abstract @name); a no-op without it.
    Failures are logged once and never fatal."""

    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self._socket = None
        self._failed = False
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        wanted = usec and usec.isdigit() and int(usec) > 0 and (
            not pid or pid == str(os.getpid()))
        self.watchdog_seconds = int(usec) / 1e6 if wanted else None

    @property
    def enabled(self):
        return self.address is not None

    def notify(self, *lines):
        if not self.address:
            return False
        message = "\n".join(lines).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self.address)
            self._failed = False
            return True
        except OSError as error:
            if not self._failed:
                log.error("sd_notify to %r failed: %s", self.address, error)
            self._failed = True
            return False

    def reloading(self):
        """Tell systemd a reload has begun; notify("READY=1") when it is done, failed or
        not: without it the unit stays "reloading" for good (systemd 252 and 254 re-arm
        the reload timeout forever). The CLOCK_MONOTONIC timestamp shows Type=notify-reload
        that this reload started after its signal (sd_notify(3))."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self):
        if self._socket is not None:
            self._socket.close()


class JournalFormatter(logging.Formatter):
    """No timestamps (journald adds them); the level as a <N> priority prefix."""

    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record):
        text = super().format(record)
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def stderr_is_journal(environ=os.environ):
    """True when stderr is the journal stream systemd set up ($JOURNAL_STREAM=dev:ino)."""
    stream = environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


HOMES = ("/home", "/root", "/run/user")
WATCHDOG_SECONDS = 60
STOP_SECONDS = 30
NOTIFY_RELOAD_SINCE = 253  # Type=notify-reload is new in systemd 253


def manager_version(user=False):
    """The major version of the systemd that will run the unit: the running manager's if
    systemctl can reach it, else the installed systemctl's; None if neither answers."""
    scope = ["--user"] if user else []
    for command, pattern in [(["systemctl", *scope, "show", "--property=Version", "--value"],
                              r"(\d+)"),
                             (["systemctl", "--version"], r"systemd (\d+)")]:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.match(pattern, result.stdout.strip())
        if result.returncode == 0 and match:
            return int(match.group(1))
    return None


def reload_lines(version):
    """How `systemctl reload` reaches the daemon's SIGHUP handler on this systemd."""
    if version is not None and version >= NOTIFY_RELOAD_SINCE:
        # systemd sends SIGHUP and waits for RELOADING=1 and READY=1: a synchronous reload.
        return ["Type=notify-reload"]
    # Older (or unknown) systemd: ExecReload only sends the signal, so `systemctl reload`
    # returns before the reload is done; the daemon's RELOADING=1 and READY=1 still show it.
    return ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID"]


def unit_file(config, user=False, version=None):
    """A ready unit for this installation: this interpreter, this config, hardened as far as
    TensorFlow and the paths allow. `version`: the systemd's major version (default: asked)."""
    if version is None:
        version = manager_version(user)
    interpreter = Path(sys.executable).absolute()
    config_path = Path(config.source).absolute() if config.source else None
    for key, path in [("inbox", config.inbox), ("save", config.save), ("config", config_path)]:
        _check_path(key, path)
    workdir = _working_directory(config_path.parent if config_path else Path.cwd())
    config_arg = f" --config {_exec_arg(config_path)}" if config_path else ""
    # systemd wants these normalized ("path is not normalized" for a "..").
    writable = sorted({os.path.realpath(config.inbox), os.path.realpath(config.save)})
    used = [interpreter, Path(os.path.realpath(interpreter)), Path(sys.prefix),
            Path(sys.base_prefix), Path(__file__).resolve().parents[1], config.inbox,
            config.save]  # parents[1]: the daemon package
    used += [p for p in (config_path, config.data.path) if p]
    lines = [
        "[Unit]",
        # Not at the end of the line, where systemd drops white space and reads a
        # backslash as a line continuation.
        f"Description=Wardrobe: labels images in {_specifiers(config.inbox)} with a classifier "
        "it trains",
        "After=local-fs.target",
        "",
        "[Service]",
        *reload_lines(version),
        "NotifyAccess=main",
        f"ExecStart={_executable(interpreter)} -m daemon run{config_arg}",
        f"WorkingDirectory={_specifiers(workdir)}",
        "Environment=PYTHONUNBUFFERED=1",
        # keras.datasets caches downloads under $KERAS_HOME: keep it in the writable save/
        f"Environment={_env('KERAS_HOME', config.save / 'keras')}",
        "Restart=on-failure",
        "RestartSec=2",
        "RestartPreventExitStatus=2",  # a config error must not crash-loop
        "KillSignal=SIGTERM",
        # TensorFlow import, data loading, a dataset download; also the reload timeout.
        "TimeoutStartSec=300",
        f"TimeoutStopSec={STOP_SECONDS}",  # a stop takes well under a second
        f"WatchdogSec={WATCHDOG_SECONDS}",
    ]
    lines += _hardening(user, used, writable, network_lines(config))
    lines += ["UMask=0022", "", "[Install]",
              f"WantedBy={'default.target' if user else 'multi-user.target'}", ""]
    return "\n".join(lines)


def _hardening(user, used, writable, network):
    """The sandbox of a unit whose process uses the paths `used` and writes `writable`."""
    under = lambda roots: any(str(p) == r or str(p).startswith(r + "/")  # noqa: E731
                              for p in used for r in roots)
    if user:
        # A user manager can only apply mount namespaces where unprivileged user
        # namespaces are allowed; keep the unit portable.
        return ["NoNewPrivileges=yes"]
    lines = []
    if os.getuid() != 0:
        lines.append(f"User={getpass.getuser()}")
    writable = list(writable)
    if under(["/tmp", "/var/tmp"]):
        # No PrivateTmp: it would hide our own paths. Keras needs a writable temporary
        # folder at import, and ProtectSystem=strict makes /tmp read-only otherwise.
        writable += ["/tmp", "/var/tmp"]
    lines += ["NoNewPrivileges=yes", "ProtectSystem=strict"]
    if writable:
        lines.append(f"ReadWritePaths={' '.join(_list_item(p) for p in writable)}")
    if not under(["/tmp", "/var/tmp"]):
        lines.append("PrivateTmp=yes")
    # Read-only, not hidden, when the interpreter or data live in a home folder.
    lines.append("ProtectHome=read-only" if under(HOMES) else "ProtectHome=yes")
    return lines + [
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        *network,
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=",
        # Not MemoryDenyWriteExecute: TensorFlow's oneDNN kernels are JIT-compiled.
    ]


def worker_unit_file(config, user=False):
    """A hardened unit for `wardrobe worker`: it reads photos (the shares, read-only),
    writes only its cache (CacheDirectory=), and reaches the network only to the broker."""
    if config.cluster.broker is None:
        raise ConfigError("cluster.broker", "a worker needs the coordinator's broker, such as "
                          'cluster: {broker: "redis://HOST:6379/0"}')
    interpreter = Path(sys.executable).absolute()
    config_path = Path(config.source).absolute() if config.source else None
    _check_path("config", config_path)
    config_arg = f" --config {_exec_arg(config_path)}" if config_path else ""
    workdir = _working_directory(config_path.parent if config_path else Path.cwd())
    used = [interpreter, Path(os.path.realpath(interpreter)), Path(sys.prefix),
            Path(sys.base_prefix), Path(__file__).resolve().parents[1]]
    used += [Path(mine) for _, mine in config.cluster.paths]
    used += [p for p in (config_path,) if p]
    lines = [
        "[Unit]",
        f"Description=Wardrobe worker: featurizes photos for the coordinator at "
        f"{_specifiers(show_broker(config.cluster.broker))}",
        "Wants=network-online.target",
        "After=network-online.target remote-fs.target",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={_executable(interpreter)} -m daemon worker{config_arg}",
        f"WorkingDirectory={_specifiers(workdir)}",
        "Environment=PYTHONUNBUFFERED=1",
        "CacheDirectory=wardrobe-worker",  # the converted backbone ($CACHE_DIRECTORY)
        "Restart=on-failure",
        "RestartSec=2",
        "RestartPreventExitStatus=2",  # a config error (a wrong password) must not loop
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_SECONDS}",
    ]
    lines += _hardening(user, used, [], broker_lines(config.cluster.broker))
    lines += ["UMask=0022", "", "[Install]",
              f"WantedBy={'default.target' if user else 'multi-user.target'}", ""]
    return "\n".join(lines)


def broker_lines(url):
    """A worker's network: the broker's addresses and nothing else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return ["RestrictAddressFamilies=AF_UNIX", "IPAddressDeny=any"]
    allowed = _addresses("cluster.broker", parts.hostname, parts.port or 6379)
    return ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            f"IPAddressAllow={' '.join(sorted(allowed))}", "IPAddressDeny=any"]


def _addresses(key, host, port):
    try:
        return {address.split("%")[0] for address in addresses.resolve((host, port))}
    except (socket.gaierror, UnicodeError) as error:
        raise ConfigError(key, f"cannot resolve host {host!r}: "
                          f"{getattr(error, 'strerror', None) or error}") from None


def network_lines(config):
    """The network the daemon needs, and no more: the journal and sd_notify (AF_UNIX)
    always; the internet for a Fashion-MNIST download (data.source auto or keras); the
    address families of metrics.listen and web.listen, only loopback peers when they listen
    there, and only their ports to listen on; the
    broker's addresses with cluster.broker."""
    families = {"AF_UNIX"}
    downloads = config.data.source in ("auto", "keras")
    if downloads:
        families |= {"AF_INET", "AF_INET6"}
    peers = set()  # the only peers, unless anyone may be (downloads, a public port)
    anyone = downloads
    ports = []  # the only ports it may listen on
    for listen in (config.metrics.listen, config.web.listen):
        if not listen:
            continue
        ports.append(listen[1])
        named = addresses.resolve(listen)
        families |= {family.name for family in named.values()}
        if addresses.is_loopback(addresses=named):
            peers.add("localhost")
        else:
            anyone = True
    broker = config.cluster.broker and urllib.parse.urlsplit(config.cluster.broker)
    if broker and broker.scheme != "unix":
        families |= {"AF_INET", "AF_INET6"}
        peers |= _addresses("cluster.broker", broker.hostname, broker.port or 6379)
    order = ("AF_UNIX", "AF_INET", "AF_INET6")
    lines = ["RestrictAddressFamilies=" + " ".join(f for f in order if f in families)]
    if peers and not anyone:
        lines += [f"IPAddressAllow={' '.join(sorted(peers))}", "IPAddressDeny=any"]
    # bind() to any other port is refused (systemd 249+; no listening port: none at all)
    lines += [f"SocketBindAllow=tcp:{port}" for port in ports] + ["SocketBindDeny=any"]
    return lines


# How each setting wants a path written, as systemd 252 parses it (systemd.syntax(7),
# checked with systemd-analyze verify and real starts). Every one expands %-specifiers.
UNSAFE = re.compile(r"[\s\"'\\$;\x00-\x1f\x7f]")  # what makes a word need quoting


def _specifiers(value):
    return str(value).replace("%", "%%")


def _c_quoted(text):
    """Double quotes with C escapes: ExecStart= and Environment= unescape \\, \", \n..."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escapes.get(c, f"\\x{ord(c):02x}" if c < " " or c == "\x7f" else c)
                         for c in text) + '"'


def _exec_arg(value):
    """An ExecStart= argument: quoted if needed, and $ doubled (systemd expands $VAR
    and ${VAR} in arguments)."""
    text = str(value)
    return _specifiers(_c_quoted(text.replace("$", "$$")) if UNSAFE.search(text) else text)


def _executable(path):
    """ExecStart='s program: never $-expanded, and systemd refuses quotes, backslashes and
    control characters in it whatever the quoting ("Executable name contains special
    characters")."""
    text = str(path)
    if re.search(r"[\"'\\\x00-\x1f\x7f]", text):
        raise WardrobeError(f"systemd cannot run an interpreter whose path has a quote, a "
                            f"backslash or a control character in it: {text!r}")
    return _specifiers(f'"{text}"' if UNSAFE.search(text) else text)


def _working_directory(path):
    """WorkingDirectory= takes the rest of the line as is: no quotes, no escapes; the
    line's trailing white space is dropped and a trailing backslash continues the line."""
    text = os.path.realpath(path)
    if text != text.rstrip() or text.endswith("\\"):
        raise ConfigError("config", f"systemd cannot use a working folder whose name ends "
                          f"in white space or a backslash: {text!r}; rename the config's "
                          "folder")
    return text


def _list_item(path):
    """A ReadWritePaths= entry: double quotes and plain backslash escapes, no C escapes."""
    text = str(path)
    if not UNSAFE.search(text):
        return _specifiers(text)
    return _specifiers('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def _env(name, value):
    text = f"{name}={value}"
    return _specifiers(_c_quoted(text) if UNSAFE.search(text) else text)


def _check_path(key, path):
    """Paths a unit file cannot hold at all: systemd reads a line break as the end of the
    setting, and ignores a setting that is not UTF-8."""
    if path is None:
        return
    text = str(path)
    if "\n" in text or "\r" in text:
        raise ConfigError(key, f"systemd cannot use a path with a line break in it: {text!r}")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ConfigError(key, f"systemd cannot use a path that is not UTF-8: {text!r}") from None
