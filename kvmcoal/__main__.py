"""python -m kvmcoal: the same as the kvmcoal command."""

import sys

from .cli import main

sys.exit(main())
