"""diffdisagg operator component."""
