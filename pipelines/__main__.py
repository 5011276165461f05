"""`python -m pipelines <job> ...`: the `msdm` command without the console script."""

from .command import main

main()
