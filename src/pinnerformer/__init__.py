"""pinnerformer: learn user representations from sequences of user actions, and rank with them."""

__version__ = "0.1.0"
