"""`python -m scalekv_core.bench kv ...`"""
import sys

from .kv import main

sys.exit(main())
