import sys

from trainers.common.cli import main
from trainers.sleep import Config, train

sys.exit(main("sleep", Config, train))
