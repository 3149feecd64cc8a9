from disagfusion.cli import main

raise SystemExit(main())
