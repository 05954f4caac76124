"""fhir-adapter: FHIR interoperability adapter for the melasma trial NCT06677931."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fhir-adapter")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
