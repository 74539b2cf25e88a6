import sys

from slimgpt_core.cli import main

sys.exit(main())
