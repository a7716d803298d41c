import sys

from trainers.common.cli import main
from trainers.snap import Config, train

sys.exit(main("snap", Config, train))
