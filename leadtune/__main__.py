from leadtune.cli import main; import sys; sys.exit(main())
