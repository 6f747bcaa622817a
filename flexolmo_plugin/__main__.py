import sys

from flexolmo_plugin.cli import main

sys.exit(main())
