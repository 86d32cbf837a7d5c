import sys

from hiq2gguf.cli import main

sys.exit(main())
