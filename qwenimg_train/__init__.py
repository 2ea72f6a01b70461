"""qwenimg-train: the trainer package, one sub-package per concern (docs/architecture.md).

The data side lives in `data_pipelines`; this package may import its sample schema
and readers, never the other way round (except the model families, for precompute).
"""

from qwenimg_train.compat import filter_import_chatter as _filter_import_chatter

_filter_import_chatter()
