import sys

from hpsweep.trainer.cli import main
from trainers.sleep import Config, train

sys.exit(main("sleep", Config, train))
