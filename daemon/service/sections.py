"""config.yaml read one mapping at a time: each value checked for its type and range,
every error naming its dotted key and what was expected (a secret is never echoed)."""

import importlib.util
import ipaddress
import math
import os
import re
import socket
import urllib.parse

import yaml

from daemon.errors import ConfigError
from daemon.service.addresses import show_broker


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(str(key), f"given twice (line {key_node.start_mark.line + 1})")
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class Section:
    """One mapping of the YAML document; remembers which keys were read."""

    def __init__(self, raw, prefix):
        if not isinstance(raw, dict):
            where = prefix.rstrip(".") or "config"
            raise ConfigError(where, f"expected a mapping of keys, got {_show(raw)}")
        self.raw, self.prefix, self.known = raw, prefix, set()

    def _get(self, key, default):
        self.known.add(key)
        return self.raw.get(key, default)

    def _fail(self, key, expected, value):
        raise ConfigError(self.prefix + key, f"expected {expected}, got {_show(value)}")

    def section(self, key):
        value = self._get(key, None)  # absent or null: the defaults; anything else a mapping
        return Section({} if value is None else value, f"{self.prefix}{key}.")

    def string(self, key, default, optional=False):
        value = self._get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            self._fail(key, "a path" + (" or null" if optional else ""), value)
        return value

    def token(self, key):
        """A secret for a URL and a cookie; its value is never echoed (it is a secret)."""
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise ConfigError(self.prefix + key, "expected at least 16 characters of letters, "
                              "digits and - _ . ~ (such as the output of "
                              "`python3 -c 'import secrets; print(secrets.token_urlsafe())'`)")
        return value

    def choice(self, key, default, choices):
        value = self._get(key, default)
        if value not in choices:
            self._fail(key, "one of " + ", ".join(choices), value)
        return value

    def integer(self, key, default, minimum, maximum=None):
        value = self._get(key, default)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < minimum or (maximum is not None and value > maximum):
            limits = f"from {minimum} to {maximum}" if maximum else f"of at least {minimum}"
            self._fail(key, f"a whole number {limits}", value)
        return value

    def number(self, key, default, above=None, at_least=None):
        """An int or float (not a bool, not inf or nan) above or at least a limit."""
        value = self._get(key, default)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        if not ok or (above is not None and value <= above) or (
                at_least is not None and value < at_least):
            limit = f"above {above}" if above is not None else f"of at least {at_least}"
            self._fail(key, f"a number of seconds {limit}", value)
        return value

    def checkpoint_every(self, key):
        value = self._get(key, "epoch")
        if value == "epoch":
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        self._fail(key, "'epoch' or a positive number of batches", value)

    def labels(self, key, default):
        """As many distinct non-empty names as `default` has (the model's outputs)."""
        count = len(default)
        value = self._get(key, list(default))
        if not isinstance(value, list) or len(value) != count or not all(
            isinstance(label, str) and label.strip() for label in value
        ):
            self._fail(key, f"a list of {count} non-empty names (the model has "
                       f"{count} outputs)", value)
        if len(set(value)) != len(value):
            self._fail(key, "distinct names", value)
        return tuple(value)

    def extensions(self, key, default, reserved):
        """File extensions, lower case without the dot; none of `reserved`'s."""
        value = self._get(key, list(default))
        if not isinstance(value, list) or not value or not all(
            isinstance(ext, str) and _EXTENSION.fullmatch(ext) for ext in value
        ):
            self._fail(key, "a non-empty list of file extensions such as [png, jpg] "
                       "(letters and digits, one per entry)", value)
        extensions = {ext.lstrip(".").lower() for ext in value}
        taken = sorted(extensions.intersection(reserved))
        if taken:
            self._fail(key, f"image extensions; {', '.join(taken)} cannot be (json and txt "
                       "are sidecars, tmp our temporary files)", value)
        return tuple(sorted(extensions))

    def listen(self, key):
        """"HOST:PORT" ("[::1]:9464" for an IPv6 address) -> (host, port); null: None."""
        value = self._get(key, None)
        if value is None:
            return None
        expected = 'an address to listen on as "HOST:PORT", such as "127.0.0.1:9464"'
        match = _LISTEN.fullmatch(value) if isinstance(value, str) else None
        if not match:
            self._fail(key, expected, value)
        host, port = match["host"].strip("[]"), int(match["port"])
        if not 1 <= port <= 65535:
            self._fail(key, f"{expected} with a port from 1 to 65535", value)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if match["host"].startswith("[") or not _HOSTNAME.fullmatch(host):
                self._fail(key, expected, value)
            try:  # a name: resolved once here, so a typo is a config error, not a crash
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as error:
                raise ConfigError(self.prefix + key, f"cannot resolve host {host!r}: "
                                  f"{getattr(error, 'strerror', None) or error}") from None
        return host, port

    def broker(self, key):
        """A Redis URL, redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (rediss:// over TLS,
        unix:///PATH?db=N); null: None. Only its form here: a broker that is down is not a
        config error (it may come back)."""
        value = self._get(key, None)
        if value is None:
            return None
        expected = 'a Redis URL such as "redis://:PASSWORD@HOST:6379/0"'
        if not isinstance(value, str):
            self._fail(key, expected, value)
        try:
            url = urllib.parse.urlsplit(value)
            port, db = url.port, url.path.strip("/")
        except ValueError:
            self._fail(key, expected, show_broker(value))
        if url.scheme == "unix":
            ok = bool(url.path)
        else:
            ok = url.scheme in ("redis", "rediss") and bool(url.hostname) and (
                port is None or 1 <= port <= 65535) and (not db or db.isdigit())
        if not ok:
            self._fail(key, expected, show_broker(value))
        if importlib.util.find_spec("dramatiq") is None or \
                importlib.util.find_spec("redis") is None:
            raise ConfigError(self.prefix + key, "the cluster needs Dramatiq and redis-py, "
                              "which are not installed: pip install 'wardrobe[cluster]' (or "
                              "pip install 'dramatiq[redis]')")
        return value

    def prefixes(self, key):
        """{coordinator's path prefix: this machine's}, both absolute -> sorted pairs,
        longest prefix first (the most specific one wins)."""
        value = self._get(key, None)
        if value is None:
            return ()
        expected = "a mapping of absolute path prefixes, {COORDINATOR'S PATH: THIS MACHINE'S}"
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k.startswith("/")
                and v.startswith("/") for k, v in value.items()):
            self._fail(key, expected, value)
        pairs = {os.path.normpath(k): os.path.normpath(v) for k, v in value.items()}
        return tuple(sorted(pairs.items(), key=lambda pair: (-len(pair[0]), pair[0])))

    def reject_unknown(self):
        unknown = sorted(str(key) for key in self.raw if key not in self.known)
        if unknown:
            name = self.prefix + unknown[0]
            raise ConfigError(name, "unknown key (known here: "
                              + ", ".join(sorted(self.known)) + ")")


_EXTENSION = re.compile(r"\.?[A-Za-z0-9]+")
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")
_LISTEN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):(?P<port>[0-9]{1,5})")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?")


def _show(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
