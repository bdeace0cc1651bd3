"""ftctl launch layer: configuration, the training and evaluation entry points, and the `ftctl` CLI."""

__version__ = "0.1.0"
