"""Wardrobe: a daemon that trains a Keras image classifier with crash-safe checkpoints."""

__version__ = "0.1.0"
