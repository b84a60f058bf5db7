"""The addresses a config names (metrics.listen, web.listen, cluster.broker): how they
are shown in logs and status (never a password), and whether they are loopback only."""

import ipaddress
import socket
import urllib.parse


def show_listen(listen):
    """(host, port) as written in config.yaml; "off" for None."""
    if listen is None:
        return "off"
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def show_broker(url):
    """The broker's URL as it may be shown and logged: its password (user:PASSWORD@ or
    ?password=) as ***; "off" for None."""
    if url is None:
        return "off"
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() == "password" for key, _ in query):
            parts = parts._replace(query="&".join(
                f"{key}=***" if key.lower() == "password" else
                urllib.parse.urlencode([(key, value)]) for key, value in query))
        return (f"{parts.scheme}://{parts.netloc}{parts.path}"
                + (f"?{parts.query}" if parts.query else ""))
    except ValueError:
        return "(a URL that cannot be read)"


def resolve(listen):
    """{address: its family (socket.AF_INET or AF_INET6)} that (host, port) names."""
    host, port = listen
    return {info[4][0]: info[0] for info in socket.getaddrinfo(host, port,
                                                                type=socket.SOCK_STREAM)}


def is_loopback(listen=None, addresses=None):
    """Does (host, port) -- or do `addresses`, resolve()'s -- name loopback addresses only?"""
    if addresses is None:
        try:
            addresses = resolve(listen)
        except (socket.gaierror, UnicodeError):
            return False
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
