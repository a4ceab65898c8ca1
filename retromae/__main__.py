import sys

from retromae.cli import main

sys.exit(main())
