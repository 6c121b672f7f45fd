"""`python -m diffdisagg.worker.gateway`: run the gateway."""

from diffdisagg.worker.gateway.server import main

main()
