"""The coordinator's view of the workers: who beats (each worker's key alive:<name>
expires ALIVE_SECONDS after its last heartbeat, timed by Redis, so no two machines' clocks
are compared), how many decode processes each has, which refuse our jobs and why. Read by
the cluster thread (look), asked by the labeller's and the data source's threads (slots)."""

import datetime
import json
import time

from daemon.cluster import broker as wire

REFUSED_SECONDS = 60.0  # a worker that refused our jobs is asked again after this


class Roster:
    def __init__(self):
        self.workers = {}  # name -> its last heartbeat's state, with "alive" and "seen"
        self.refused = {}  # name -> (why it refuses our jobs, monotonic time it said so)

    def look(self, states, ttls, client):
        """Take in the workers' hash (`states`: {name bytes: JSON}) and the milliseconds
        their alive keys have left (`ttls`); forget workers gone for FORGOTTEN_SECONDS."""
        workers, now = {}, time.time()
        for name, ttl in zip(states, ttls):
            try:
                state = json.loads(states[name])
            except ValueError:
                continue
            state["alive"] = ttl > 0
            if ttl > 0:
                state["seen"] = now - (wire.ALIVE_SECONDS - ttl / 1000)
            elif now - state.get("seen", 0) > wire.FORGOTTEN_SECONDS:
                client.hdel(wire.WORKERS_KEY, name)
                continue
            workers[name.decode()] = state
        self.workers = workers  # replaced, never changed: other threads read it
        for name in [n for n in self.refused if not workers.get(n, {}).get("alive")]:
            del self.refused[name]

    def alive(self, name):
        return self.workers.get(name, {}).get("alive", False)

    def takes(self, name):
        """Does worker `name` take our jobs? Not while it refuses them: asked again
        REFUSED_SECONDS after its last refusal (its share mounted since, say)."""
        refused = self.refused.get(name)
        return self.alive(name) and (refused is None or
                                     time.monotonic() - refused[1] > REFUSED_SECONDS)

    def refuses(self, name, why):
        """Worker `name` refused a job: True if it said something new."""
        new = self.refused.get(name, (None,))[0] != why
        self.refused[name] = (why, time.monotonic())
        return new

    def taking(self):
        return sum(1 for name in list(self.workers) if self.takes(name))

    def slots(self):
        """Decode processes of the workers taking our jobs."""
        return sum(state.get("slots", 1) for name, state in list(self.workers.items())
                   if self.takes(name))

    def snapshot(self):
        """status --json's `workers`."""
        shown = []
        for name, state in sorted(self.workers.items()):
            seen = state.get("seen")
            shown.append({"name": name, "alive": state["alive"],
                          "last_seen": seen and datetime.datetime.fromtimestamp(
                              seen, datetime.timezone.utc).isoformat(timespec="seconds"),
                          "jobs": state.get("jobs", 0),
                          "photos_per_second": state.get("photos_per_second", 0.0)
                          if state["alive"] else 0.0,
                          "refused": self.refused.get(name, (None,))[0]})
        return shown
