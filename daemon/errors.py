"""Exit codes and the few exceptions that map onto them."""

EXIT_OK = 0  # clean stop
EXIT_FATAL = 1  # anything else that ends the daemon
EXIT_CONFIG = 2  # bad config, arguments, or a checkpoint made for another model


class WardrobeError(Exception):
    """A fatal error with a message meant for the user."""

    exit_code = EXIT_FATAL


class ConfigError(WardrobeError):
    """Invalid configuration; the message names the key and what was expected."""

    exit_code = EXIT_CONFIG

    def __init__(self, key, message):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class IncompatibleCheckpoint(WardrobeError):
    """save/ holds a checkpoint of another architecture than the config asks for."""

    exit_code = EXIT_CONFIG


class AlreadyRunning(WardrobeError):
    """Another daemon holds the lock on the same save folder."""
