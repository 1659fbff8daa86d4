"""``python -m unitedllm.devservices [MQTT_PORT S3_PORT]``: the dev services until Ctrl-C."""

import os
import sys
from pathlib import Path

from unitedllm.devservices.serve import serve

ports = [int(arg) for arg in sys.argv[1:3]] + [0, 0]
serve(
    Path(os.environ["UNITEDLLM_SERVICES_DIR"]) if os.environ.get("UNITEDLLM_SERVICES_DIR") else None,
    mqtt_port=ports[0] or None,
    s3_port=ports[1] or None,
)
