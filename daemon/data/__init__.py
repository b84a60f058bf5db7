"""The data side: the configured source in, immutable numbered data versions out.

Owns what the trainer trains on: `dataset` (Fashion-MNIST from keras.datasets, an IDX
folder, or the sample bundled here as package data in fashion-mnist-sample/; the listing of
a folder of class folders), `datasource` (keeps the newest version true to the source),
`versions` (the versions in save/data/) and `images` (decode any image and make it look
like a Fashion-MNIST example; the inbox's decode workers use it too).

In: the source named by the config -- a folder of class folders (watched with
daemon.inbox.watch, decoded in daemon.inbox.decoding's workers), IDX files or keras.datasets.
Out: data versions in save/data/, which daemon.training trains on and every checkpoint names.
"""
