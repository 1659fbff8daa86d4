"""Local MQTT broker and S3 store for development and tests: mosquitto and SeaweedFS on 127.0.0.1.

Both are async context managers that start the service on free ports with generated
credentials, wait (bounded) until it answers, and stop it on exit; a service that does not come
up raises :class:`CommError` with the tail of its log. :func:`serve` runs both until Ctrl-C and
prints the ``comm_args`` snippet that points a run at them (``unitedllm dev-services``).

One module per part: :mod:`~.process` (ports and child processes), :mod:`~.tls`,
:mod:`~.mosquitto`, :mod:`~.seaweedfs`, and :mod:`~.serve` (both together).
"""

from unitedllm.devservices.mosquitto import Mosquitto
from unitedllm.devservices.process import HOST, check_port, free_port
from unitedllm.devservices.seaweedfs import SeaweedS3
from unitedllm.devservices.serve import DevServices, dev_services, serve
from unitedllm.devservices.tls import TlsFiles, make_tls_files

__all__ = [
    "HOST",
    "DevServices",
    "Mosquitto",
    "SeaweedS3",
    "TlsFiles",
    "check_port",
    "dev_services",
    "free_port",
    "make_tls_files",
    "serve",
]
