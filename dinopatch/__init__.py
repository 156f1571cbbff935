"""DinoPatch: anomaly detection on aligned parts from DINOv2 patch memories."""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceExportFinder(importlib.abc.MetaPathFinder):
    """Finds ``dinopatch.export`` in the top-level ``export/`` folder of a source checkout.

    The design card puts the export code at the repository's top level; wheels
    and editable installs map it to ``dinopatch.export`` (pyproject
    ``package-dir``), a checkout on ``PYTHONPATH`` needs this.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "dinopatch.export":
            return None
        return importlib.util.spec_from_file_location(fullname, self.folder / "__init__.py",
                                                      submodule_search_locations=[str(self.folder)])


_root = Path(__file__).resolve().parent.parent
_export = _root / "export"
# Only in this project's own checkout: in site-packages a top-level "export" is somebody else's.
_checkout = (_root / "setup.py").is_file() and (_root / "csrc").is_dir()
if _checkout and (_export / "__init__.py").is_file() and not any(isinstance(f, _SourceExportFinder)
                                                                  for f in sys.meta_path):
    # Ahead of an editable install of another checkout, which would map the name to its own folder.
    sys.meta_path.insert(0, _SourceExportFinder(_export))

from . import kernels  # noqa: E402
from .detector import DinoPatch, NotFittedError, Result  # noqa: E402

__all__ = ["DinoPatch", "NotFittedError", "Result", "kernels", "__version__"]
