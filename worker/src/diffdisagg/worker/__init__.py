"""diffdisagg worker component."""
