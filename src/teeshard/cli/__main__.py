import sys

from teeshard.cli import main

sys.exit(main())
