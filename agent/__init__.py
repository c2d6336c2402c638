"""corrosion-edge agent: the edge daemon and CLI that find rust in camera frames."""

__version__ = "0.1.0"
