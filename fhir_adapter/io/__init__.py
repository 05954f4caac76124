"""Readers: CSV files of the eCRF export and JSON records of the webhook (SPEC §3)."""

from fhir_adapter.io.csvfile import CsvFile, RawRow, open_csv
from fhir_adapter.io.jsonrecords import load_json_records

__all__ = ["CsvFile", "RawRow", "load_json_records", "open_csv"]
