"""Data files that ship inside installed Python packages, found without importing the package
(importing some of them pulls heavy or broken dependencies)."""
import importlib.util
from pathlib import Path

from ..errors import MieInputError


def package_path(package, relative, dataset, install):
    """The path ``relative`` inside installed ``package`` (a file or a folder), for built-in dataset
    ``dataset``; ``install`` is the pip command that provides it, named in the one-line error."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MieInputError(f"dataset '{dataset}' needs the {package} package: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise MieInputError(f"{package} is installed but {path} is missing; reinstall it ({install})")
    return path
