"""``python -m unitedllm``: the same as the ``unitedllm`` command."""

from unitedllm.cli import main

main()
