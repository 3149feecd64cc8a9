"""Suite-wide setup.

The kubernetes client reads $KUBECONFIG once, when it is imported, so the
suite points it at one file of its own before anything imports it; tests that
run the operator in this process write their KMock server into that file
(tests/operator/kubeconfig.py). Nothing here reaches a real cluster.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_KUBECONFIG_DIR = tempfile.mkdtemp(prefix="disagfusion-kubeconfig-")
os.environ["KUBECONFIG"] = str(Path(_KUBECONFIG_DIR) / "kubeconfig")
