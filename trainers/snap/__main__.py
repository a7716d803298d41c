import sys

from hpsweep.trainer.cli import main
from trainers.snap import Config, train

sys.exit(main("snap", Config, train))
