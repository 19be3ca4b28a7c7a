"""`python -m scalekv_core.bench kv ...` and `python -m scalekv_core.bench fidelity ...`"""
import sys

USAGE = """usage: python -m scalekv_core.bench {kv,fidelity,decode,t5,launches} ...

  kv        memory and speed of every KV policy, as ratios to the full cache
  fidelity  image fidelity of every KV policy against the full cache (PSNR, SSIM, bits), shardable with torchrun
  decode    tiled VAE decode against the whole decode (PSNR, measured and planned peak, time)
  t5        an 8-bit T5 against the plain one (features and images)
  launches  a census of the ops one generation dispatches, per scale and layer, with no compute

`python -m scalekv_core.bench kv --help`, `... fidelity --help` or `... decode --help` lists each one's flags."""

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    print(USAGE)
    sys.exit(0 if len(sys.argv) > 1 else 2)
if sys.argv[1] == "fidelity":
    from .fidelity import main as fidelity_main

    sys.exit(fidelity_main(sys.argv[2:]))
if sys.argv[1] == "decode":
    from .decode import main as decode_main

    sys.exit(decode_main(sys.argv[2:]))
if sys.argv[1] == "launches":
    from .launches import main as launches_main

    sys.exit(launches_main(sys.argv[2:]))
if sys.argv[1] == "t5":
    from .t5 import main as t5_main

    sys.exit(t5_main(sys.argv[2:]))

from .kv import main

sys.exit(main())
