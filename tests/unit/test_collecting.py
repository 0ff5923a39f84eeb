"""The garbage collector's settings for the poller."""

from __future__ import annotations

import gc

from agent.collecting import YOUNG_GENERATION, tune_for_polling


def test_tuning_raises_the_young_generation_and_freezes_what_exists() -> None:
    before = gc.get_threshold()
    try:
        assert tune_for_polling() == (YOUNG_GENERATION, 10, 10)
        assert gc.get_threshold()[0] == YOUNG_GENERATION
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # cycles are still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
