"""The operator's API: names of the custom resources, the schema that generates the CRDs, the typed spec."""
