"""The installed package's version (a module of its own, so any module can read it without importing the package)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokensparse")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
