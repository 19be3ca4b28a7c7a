"""`python -m scalekv_core.bench kv ...` and `python -m scalekv_core.bench fidelity ...`"""
import sys

USAGE = """usage: python -m scalekv_core.bench {kv,fidelity} ...

  kv        memory and speed of every KV policy, as ratios to the full cache
  fidelity  image fidelity of every KV policy against the full cache (PSNR, SSIM, bits), shardable with torchrun

`python -m scalekv_core.bench kv --help` or `... fidelity --help` lists each one's flags."""

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    print(USAGE)
    sys.exit(0 if len(sys.argv) > 1 else 2)
if sys.argv[1] == "fidelity":
    from .fidelity import main as fidelity_main

    sys.exit(fidelity_main(sys.argv[2:]))

from .kv import main

sys.exit(main())
