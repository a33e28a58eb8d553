"""The VAE model server: serves an exported bundle with onnxruntime; never imports torch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vae-server")
except PackageNotFoundError:  # running from a source checkout that is not installed
    __version__ = "0.0.0+source"
