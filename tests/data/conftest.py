"""Every data test starts and ends with an empty per-process bad-sample counter."""

import pytest

from ldmclip.data.samples import drain_pending


@pytest.fixture(autouse=True)
def _no_pending():
    drain_pending()
    yield
    drain_pending()
