"""De-identified export in Bulk Data layout (SPEC §9, §13), ruled by ``mappings/deidentify.yaml``.

A limited data set: subject ids and every identifier that reveals them become keyed-HMAC
pseudonyms (``FHIR_ADAPTER_DEID_KEY``), each subject's dates move back by an offset derived from
the key, free text, birth date and MRN are dropped, and anything the allow-list does not name is
dropped. References are rewritten so they still resolve inside the export.
"""

from fhir_adapter.export.bulk import MANIFEST, BulkWriter, OutputRefused, check_output
from fhir_adapter.export.keys import MissingKey, key_bytes
from fhir_adapter.export.pipeline import Exporter, ExportResult, Spooled
from fhir_adapter.export.rules import DeidRules, load_rules

__all__ = [
    "MANIFEST",
    "BulkWriter",
    "DeidRules",
    "ExportResult",
    "Exporter",
    "MissingKey",
    "OutputRefused",
    "Spooled",
    "check_output",
    "key_bytes",
    "load_rules",
]
