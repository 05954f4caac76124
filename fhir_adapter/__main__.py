from fhir_adapter.cli import main

main()
