import sys

from cilkit.cli import main

sys.exit(main())
