"""Registry queries (SPEC §9): the trial's SQL-on-FHIR views, run embedded or on Spark."""
