"""Readers: CSV files of the eCRF export and JSON records of the webhook (SPEC §3); the
output-path guard (``fhir_adapter.io.outputs``)."""

from fhir_adapter.io.csvfile import CsvFile, CsvLimits, RawRow, RowProblem, open_csv, source_exists
from fhir_adapter.io.jsonrecords import load_json_records

__all__ = [
    "CsvFile",
    "CsvLimits",
    "RawRow",
    "RowProblem",
    "load_json_records",
    "open_csv",
    "source_exists",
]
