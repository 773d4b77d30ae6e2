import sys

from kv3d.cli.main import main

sys.exit(main())
