"""``python -m unitedllm.packaging run PACKAGE.zip --rank N --run-id ID``: the package runner on its own."""

from unitedllm.packaging.cli import package_app

package_app(prog_name="unitedllm package")
