"""``python -m ecg_r1.cli``: the ``ecg-r1`` command, for launchers that start a module
(``accelerate launch -m ecg_r1.cli train ...``)."""

import sys

from ecg_r1.cli import main

sys.exit(main())
