"""``python -m dien_tutorial``: see :mod:`dien_tutorial.cli`."""

from dien_tutorial.cli import main

raise SystemExit(main())
