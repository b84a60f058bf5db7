"""The cluster's wire, shared by the coordinator and the workers: the Redis connection,
the jobs (Dramatiq messages on one queue), the answers, and the keys they live under.

Dramatiq carries the jobs: its Redis broker acknowledges a message only once a worker has
run it and gives a dead worker's messages to another one. It is not trusted for
correctness (a job may still be lost with Redis, or run twice): the coordinator knows what
it sent, takes each answer at most once, and sends again what was not answered in time.
Answers come back on a Redis list of the coordinator's run, read with BLPOP; features are
float32 arrays in an .npz (numpy's own format, read without pickle).

Keys, all under "wardrobe:": the queue "featurize" (Dramatiq's), "job:<coordinator>:<run>:
<job>" (the job is still wanted; the worker taking it writes its name there),
"answers:<coordinator>:<run>", "alive:<worker>" (expires ALIVE_SECONDS after the worker's
last heartbeat) and the hash "workers" (each worker's counts).
"""

import io
import json
import logging
import socket
import urllib.parse

import numpy as np

from daemon.errors import ConfigError
from daemon.service.addresses import show_broker

NAMESPACE = "wardrobe"
QUEUE = "featurize"
ACTOR = "featurize"
HEARTBEAT_SECONDS = 2.0
ALIVE_SECONDS = 10  # a worker not heard of for this long is gone
JOB_SECONDS = 600  # a job not taken in this long is no longer wanted (it was sent again)
ANSWERS_SECONDS = 3600  # answers nobody reads (a coordinator that died) go after this
FORGOTTEN_SECONDS = 86400  # a worker's counts, after its last heartbeat


def client(url):
    """A redis.Redis for `url`, with timeouts: a broker that hangs must not hang us."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                health_check_interval=30)


def make_broker(url, redis_client=None):
    """Dramatiq's RedisBroker on `url`, without middleware: no retries of its own (the
    coordinator decides what is sent again), no time limits (a job is a second's work)."""
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(client=redis_client or client(url), namespace=NAMESPACE,
                         middleware=[], heartbeat_timeout=ALIVE_SECONDS * 1000,
                         dead_message_ttl=ANSWERS_SECONDS * 1000)
    broker.declare_queue(QUEUE)
    return broker


def check(redis_client, url):
    """Ping the broker. A ConfigError (key cluster.broker) for what will not go away by
    itself: a wrong password, a database that does not exist, a server that is not Redis;
    redis.ConnectionError for what may (a broker down or unreachable)."""
    import redis

    shown = show_broker(url)
    try:
        redis_client.ping()
    except redis.AuthenticationError as error:
        raise ConfigError("cluster.broker", f"{shown} refused the password: {error}") from None
    except redis.ResponseError as error:
        raise ConfigError("cluster.broker", f"{shown}: {error}") from None
    except redis.ConnectionError as error:
        why = not_redis(url)
        if why:
            raise ConfigError("cluster.broker", f"{shown} is not a Redis server: {why}") from None
        raise redis.ConnectionError(f"{shown}: {error}") from None


def not_redis(url):
    """Why the server at `url` is not Redis, or None if it is (or cannot be asked now): an
    inline PING, answered "+PONG" or "-NOAUTH ..." by any Redis."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis":
        return None
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout=3) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError:
        return None  # down or unreachable: may come back
    if reply[:1] in (b"+", b"-"):
        return None
    if not reply:
        return "it closed the connection without a word"
    return f"it answered {reply[:24]!r}"


class _BrokerGone(logging.Filter):
    """Dramatiq says the broker is gone on every retry (CRITICAL, each with the whole job);
    we say it once, and when it is back."""

    def filter(self, record):
        text = record.getMessage()
        return "connection error" not in text and "Failed to post_process_message" not in text


def quiet_dramatiq():
    """Dramatiq's own log: its warnings and errors, not its start and stop lines, nor its
    retries while the broker is away."""
    logger = logging.getLogger("dramatiq")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _BrokerGone) for f in logger.filters):
        logger.addFilter(_BrokerGone())


def redis_errors():
    """What a call to the broker raises when it is gone: redis's errors (ConnectionError
    and TimeoutError) and Dramatiq's (ConnectionClosed)."""
    import redis
    from dramatiq.errors import ConnectionError as DramatiqConnectionError

    return (redis.ConnectionError, redis.TimeoutError, DramatiqConnectionError)


def job_key(coordinator, run, job):
    return f"{NAMESPACE}:job:{coordinator}:{run}:{job}"


def answers_key(coordinator, run):
    return f"{NAMESPACE}:answers:{coordinator}:{run}"


def alive_key(worker):
    return f"{NAMESPACE}:alive:{worker}"


# Two machines see one file with its size and mtime; the mtime maybe rounded (SMB keeps
# 100 ns, FAT 2 s), so "the same" allows this much.
MTIME_SLACK_NS = 2_000_000_000


def same_file(mine, theirs):
    """Are (size, mtime_ns) `mine` and `theirs` one file seen from two machines?"""
    return mine[0] == theirs[0] and abs(mine[1] - theirs[1]) <= MTIME_SLACK_NS


WORKERS_KEY = f"{NAMESPACE}:workers"
QUEUE_KEY = f"{NAMESPACE}:{QUEUE}"  # Dramatiq's list of waiting message ids


def message(job):
    """The Dramatiq message of `job` (a dict of JSON values, see the worker's featurize)."""
    import dramatiq

    return dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(job,), kwargs={},
                            options={})


def encode_answer(job, worker, results=None, refused=None, **more):
    """An answer to `job`: its results ([(kind, payload, extra)] in the job's order, an
    "image" payload a float32 vector or None) or why the worker `refused` it; `more`: the
    worker's feature_id, the seconds the job took."""
    meta = {"job": job, "worker": worker, "refused": refused, "results": [], **more}
    rows = []
    for kind, payload, extra in results or ():
        item = {"kind": kind, "extra": extra}
        if kind == "image" and payload is not None:
            item["row"] = len(rows)
            rows.append(np.asarray(payload, dtype=np.float32))
        elif kind != "image":
            item["why"] = str(payload)
        meta["results"].append(item)
    features = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             features=features)
    return buffer.getvalue()


def decode_answer(data):
    """(meta, features) of an answer; ValueError if it is not one."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes().decode())
            features = archive["features"]
    except (OSError, KeyError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as error:
        raise ValueError(f"not an answer: {error}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("results"), list) or \
            features.dtype != np.float32:
        raise ValueError("not an answer")
    return meta, features
