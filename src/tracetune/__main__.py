import sys

from tracetune.cli import main

sys.exit(main())
