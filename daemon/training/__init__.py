"""The training side: a data version in, checkpoint generations in save/ out.

Owns the checkpoints: `training` (the trainer: seeded per-epoch order, exact resume,
cooperative stop), `checkpoints` (the Keras callback that writes and restores a generation,
usable in any model.fit), `store` (the crash-safe generations on disk, read without
TensorFlow), `models` (the model presets) and `curves` (TensorBoard event files drawn from
committed checkpoints).

In: a data version from daemon.data.versions, the config. Out: generations in save/
(ckpt-N.npz and ckpt-N.json, model.json + model.h5) that the inbox side's classifier
reloads and `status` reads; metrics; TensorBoard curves.
"""
