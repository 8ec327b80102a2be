"""lorasurgeon's version: the installed distribution's, or "0+unknown" in a source tree never installed."""

from importlib import metadata

try:
    __version__ = metadata.version("lorasurgeon")
except metadata.PackageNotFoundError:
    __version__ = "0+unknown"
