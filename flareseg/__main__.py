import sys

from flareseg.cli import main

sys.exit(main())
