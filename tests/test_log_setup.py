"""One logging set-up for every command: libraries speak only when they fail, whenever they are imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_libraries_imported_after_the_setup_keep_their_warnings_to_themselves() -> None:
    """huggingface_hub and transformers set their loggers' level when imported: a retry warning while
    the hub is unreachable used to print before the command's own one-line error."""
    code = textwrap.dedent("""\
        import logging
        from unitedllm.log_setup import line_handler, setup_logging
        setup_logging(False, handler=line_handler("%(levelname)s %(name)s: %(message)s"))
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as transformers_logging
        hub_logging.get_logger("huggingface_hub.utils._http").warning("retrying HEAD config.json")
        transformers_logging.get_logger("transformers.modeling_utils").warning("some weights not used")
        hub_logging.get_logger("huggingface_hub.file_download").error("download failed")
        logging.getLogger("unitedllm.serving").info("serving run")
        """)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "retrying HEAD" not in done.stderr and "some weights not used" not in done.stderr
    assert "ERROR huggingface_hub.file_download: download failed" in done.stderr
    assert "INFO unitedllm.serving: serving run" in done.stderr
