"""Convert an HF checkpoint to a jaxlora (orbax) checkpoint: the same as `jaxlora convert SRC [DST]`."""

import sys

from jaxlora.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
