from hpc_zsem.cli import main

raise SystemExit(main())
