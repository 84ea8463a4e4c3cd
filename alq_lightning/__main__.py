"""``python -m alq_lightning {export,summary} ...``: see :func:`alq_lightning.cli.dispatch`."""
from alq_lightning.cli import dispatch

if __name__ == "__main__":
    raise SystemExit(dispatch())
