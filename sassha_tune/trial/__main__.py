"""``python -m sassha_tune.trial``: one trial process (:mod:`sassha_tune.trial.child`)."""

import sys

from .child import main

sys.exit(main())
