"""diffdisagg transport component."""
