"""``python -m fdet`` (and ``torchrun -m fdet``) is the ``fdet`` command."""

from fdet.cli import main

raise SystemExit(main())
