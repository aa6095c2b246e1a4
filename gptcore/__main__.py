import sys

from gptcore.cli import main

sys.exit(main())
