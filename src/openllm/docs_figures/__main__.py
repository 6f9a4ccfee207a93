"""``python -m openllm.docs_figures``: write the docs' figures (see the package docstring)."""

import sys

from . import main

sys.exit(main())
