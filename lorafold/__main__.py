"""`python -m lorafold ...`: the same CLI as the `lorafold` console script."""

import sys

from lorafold.cli import main

sys.exit(main())
