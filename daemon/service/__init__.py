"""The service around the inbox, training and data sides: the process and what it shows.

Owns `service` (the lifecycle: the only place with threads and signal handlers; starts the
decode workers and the data, trainer and labeller threads, stops them at a checkpoint),
`config` (config.yaml -> a frozen Config; each value read by `sections`, an address shown
by `addresses`), `reload` (what SIGHUP changes), `systemd` (sd_notify, journal-format log
lines, the unit file), `logs` (every stderr line a log record), `metrics` (Prometheus),
`live` (save/live.json: what the running daemon says of itself) and `status`
(`wardrobe status`, from save/ alone).

In: the command line (daemon.__main__), config.yaml, signals and systemd. Out: the other
parts, started and stopped; log lines, metrics, status, sd_notify messages. The other parts
import only `config`, `addresses` (how an address is shown), `logs` and `metrics` from here.
"""
