import pytest


@pytest.fixture
def bnb():
    """bitsandbytes.functional, or skip: the bit-exactness tests compare against the real library."""
    pytest.importorskip(
        "bitsandbytes", reason="bit-exactness checks need bitsandbytes (its CPU build is fine)"
    )
    import bitsandbytes.functional as F

    return F


@pytest.fixture
def minilm():
    from .util import minilm_linear_weights

    return minilm_linear_weights()
