import sys

from hpsweep.trainer.cli import main
from trainers.mbpa import Config, train

sys.exit(main("mbpa", Config, train))
