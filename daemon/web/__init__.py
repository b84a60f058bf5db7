"""The review page (`web.listen`): a person sees the labels and corrects them.

index (what is listed, fed by the sidecars) -> app (the page and its JSON API) <- corrections
(a person's label, durable, and a training copy) and thumbs; server runs the app in a thread.
Built by the service, which owns its thread through start(), stop() and join().
"""

from daemon.web.app import Review, app
from daemon.web.corrections import Corrections
from daemon.web.server import WebServer
from daemon.web.thumbs import Thumbs


class Web:
    def __init__(self, config, sidecars, status):
        """`sidecars`: the labeller's, whose observer is an index.Index; `status`: () ->
        status --json's object. Binds web.listen now (WardrobeError if it cannot)."""
        self.index = sidecars.observer
        self.corrections = Corrections.of(
            config, sidecars, classes=lambda: self.review.status(max_age=60).get("classes"))
        self.corrections.finish()  # what a crash interrupted, before anything else
        root = self.corrections.root
        self.review = Review(root, self.index, self.corrections, Thumbs(config.save, root),
                             status, config.web.token)
        self.server = WebServer(app(self.review), config.web.listen)

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop()

    def join(self, timeout=None):
        self.server.join(timeout)

    def rechecks(self):
        """Corrections.due(): {image: False} for the labeller."""
        return self.corrections.due()
