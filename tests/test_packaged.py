"""Data files found inside installed packages."""
import pytest

from mie.data.packaged import package_path
from mie.errors import MieInputError


def test_a_file_inside_an_installed_package_is_found():
    path = package_path("yaml", "__init__.py", "demo", "pip install PyYAML")
    assert path.is_file() and path.parent.name == "yaml"


def test_a_missing_package_or_file_is_one_line_naming_the_install():
    with pytest.raises(MieInputError, match=r"^dataset 'demo' needs the no_such_pkg_x package: pip install x$"):
        package_path("no_such_pkg_x", "data.csv", "demo", "pip install x")
    with pytest.raises(MieInputError, match=r"yaml is installed but .*nothing\.csv is missing; reinstall it"):
        package_path("yaml", "nothing.csv", "demo", "pip install PyYAML")
