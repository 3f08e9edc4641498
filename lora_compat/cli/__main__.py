"""``python -m lora_compat.cli``, as when the CLI was one module."""
import sys

from . import main

sys.exit(main())
