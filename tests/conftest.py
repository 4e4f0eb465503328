"""Shared test markers."""
import pytest

from timm_hpm.data import _find_fashion_mnist

#: Skip where Fashion-MNIST is not on this machine (Debian's dataset-fashion-mnist, or $FASHION_MNIST_DIR): the
#: same lookup the loader does.
needs_fashion_mnist = pytest.mark.skipif(
    _find_fashion_mnist(None) is None,
    reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)')
