"""``python -m unitedllm.packaging run PACKAGE.zip --rank N --run-id ID``: the package runner on its own."""

import sys

from unitedllm.packaging.cli import package_app

if not sys.stderr.isatty():
    # click's one-line "Error: ..." instead of rich's 80-column box when stderr is a pipe or a file
    package_app.rich_markup_mode = None
package_app(prog_name="unitedllm package")
