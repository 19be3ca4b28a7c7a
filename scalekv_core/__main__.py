"""`python -m scalekv_core ...`"""
import sys

from .cli import main

sys.exit(main())
