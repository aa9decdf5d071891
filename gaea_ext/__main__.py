import sys

from gaea_ext.cli import main

sys.exit(main())
