"""`python -m overmem`: the command line, also as launchers start it
(`torchrun --nproc_per_node N -m overmem run ...`, `accelerate launch -m overmem run ...`)."""

import sys

from .cli import main
from .distributed import shutdown

if __name__ == "__main__":
    try:
        code = main()
    finally:
        shutdown()
    sys.exit(code)
