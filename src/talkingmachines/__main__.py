"""``python -m talkingmachines`` (and ``torchrun ... -m talkingmachines train ...``): the CLI."""
import sys

from .cli import main

sys.exit(main())
