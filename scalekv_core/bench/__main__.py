"""`python -m scalekv_core.bench kv ...` and `python -m scalekv_core.bench fidelity ...`"""
import sys

if len(sys.argv) > 1 and sys.argv[1] == "fidelity":
    from .fidelity import main as fidelity_main

    sys.exit(fidelity_main(sys.argv[2:]))

from .kv import main

sys.exit(main())
