"""dl-rosetta's shared, framework-free layer.

Datasets, deterministic splits and normalisation, seeds, the shared command line
and outputs, and the numpy layout/weight conversions between frameworks. Nothing
in this package imports torch, tensorflow or keras; each implementation adapts
the numpy arrays returned here in its own idiom.

Importing it installs the torch/tensorflow import-order guard (see
``common.frameworks``), because every process that may use both frameworks
imports ``common`` first.
"""
from common.frameworks import install_import_guard

install_import_guard()
