import sys

from pinnerformer.cli import app

sys.exit(app())
