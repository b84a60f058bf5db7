"""Command line: `python -m daemon run|status|classify|unit|relabel|worker [--config PATH]`. No TensorFlow
import here, so a bad config or argument exits 2 in well under a second."""

import argparse
import logging
import os
import sys
from pathlib import Path

from daemon.errors import EXIT_FATAL, EXIT_OK, WardrobeError
from daemon.service import config as config_module

log = logging.getLogger("daemon")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="wardrobe", description=(
        "Train a Keras image classifier with crash-safe checkpoints and resume by itself."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = ("config file (default: ./config.yaml if present, else built-in defaults "
                   "relative to the current folder)")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    status = commands.add_parser("status", help="show training progress from save/")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    classify = commands.add_parser("classify", help="label image files with the newest "
                                   "checkpoint and print FILE<TAB>label<TAB>confidence")
    classify.add_argument("files", nargs="+", metavar="FILE")
    unit = commands.add_parser("unit", help="print a systemd unit file for this installation")
    unit.add_argument("--user", action="store_true", help="a unit for `systemctl --user`")
    unit.add_argument("--worker", action="store_true", help="a unit for `wardrobe worker` "
                      "on this machine")
    relabel = commands.add_parser("relabel", help="rewrite the sidecars of inbox images "
                                  "labelled by another checkpoint than the one labelling now")
    relabel.add_argument("--all", action="store_true", help="every sidecar, whichever model "
                         "wrote it (error sidecars too)")
    worker = commands.add_parser("worker", help="featurize photos for a coordinator (a daemon "
                                 "with cluster.broker) on this machine")
    for command in (run, status, classify, unit, relabel, worker):
        command.add_argument("--config", type=Path, help=config_help)
    return parser.parse_args(argv)


def load_config(path, worker=False):
    if path is None and Path("config.yaml").is_file():
        path = Path("config.yaml")
    return config_module.load(path, worker=worker)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = dispatch(args)
        sys.stdout.flush()  # so a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        # The reader has gone (`wardrobe status | head -1`): that is its choice, not an error.
        # Point stdout at devnull so the interpreter's final flush cannot fail again (the
        # recipe in the Python docs, signal module, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    if args.command in ("run", "worker") and "tensorflow" in sys.modules:
        # Everything is on disk and every thread joined: skip the interpreter's teardown
        # of TensorFlow, which takes most of a second and would delay a systemd stop.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def dispatch(args):
    if args.command in ("run", "worker"):
        from daemon.service import logs, service

        logs.setup()
    try:
        worker = args.command == "worker" or getattr(args, "worker", False)
        config = load_config(args.config, worker=worker)
        if args.command == "worker":
            from daemon.cluster import worker

            return worker.main(config)
        if args.command in ("classify", "relabel"):  # (status resolves it itself)
            from daemon.training.store import resolve_model

            config = resolve_model(config)  # what save/ was made with (`model: auto`)
        if args.command == "status":
            from daemon.service import status

            print(status.render(status.report(config), args.json))
            return 0
        if args.command == "unit":
            from daemon.service import systemd

            if args.worker:
                print(systemd.worker_unit_file(config, user=args.user), end="")
                return 0
            for folder in (config.inbox, config.save):  # systemd needs ReadWritePaths to exist
                folder.mkdir(parents=True, exist_ok=True)
            print(systemd.unit_file(config, user=args.user), end="")
            return 0
        if args.command == "relabel":
            from daemon.inbox import relabel

            return relabel.run(config, args.all, sys.stdout, sys.stderr)
        if args.command == "classify":
            from daemon.service import logs

            logs.import_tensorflow()
            from daemon.inbox import classifier

            return classifier.classify_files(config, args.files, sys.stdout, sys.stderr)
        return service.Service(config).run()
    except WardrobeError as error:
        if logging.getLogger().handlers:
            log.error("%s", error)
        else:
            print(f"wardrobe: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        raise  # see main()
    except Exception:
        log.exception("fatal error")
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
