"""`python -m diffdisagg.worker --role ...` runs one role worker (what the images and the launcher call);
`python -m diffdisagg.worker <command> ...` is the `diffdisagg` CLI (generate, run, gateway, worker, models)
for checkouts where the console script is not installed."""

import sys

if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
    from diffdisagg.worker.cli import main as cli_main

    sys.exit(cli_main())

from diffdisagg.worker.process import main

main()
