"""Bytes on the wire per update codec, on the Dolly learning bench's model.

The update of one client in one round of ``bench/learning.py`` (a pythia-14m-shaped GPT-NeoX trained
in full, or its LoRA adapter with ``--lora-r``) is encoded by every registered codec and written as
the safetensors blob that would travel; the bytes do not depend on the values (int8 and top-k keep a
fixed number of entries), so a random update of the right shapes measures them exactly. The encoding
and decoding time of each codec is reported too (one core's worth, CPU).

    python bench/communication.py                       # needs ../shared/data/pythia
    python bench/communication.py --lora-r 8 --out bench/results/communication.json

Prints one JSON document (or writes it to ``--out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from unitedllm.comm.codecs import available, codec_for
from unitedllm.comm.codecs.wire import UpdateEncoding, decode_update
from unitedllm.protocol.payload import encode_tensors

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_CONFIG = REPO.parent / "shared" / "data" / "pythia" / "pythia-14m" / "config.json"


def update_shapes(model_config: Path, lora_r: int | None) -> dict[str, torch.Tensor]:
    """A random update with the shapes of the trained parameters (the whole model, or LoRA adapters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_config.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if lora_r is not None:
        shapes = {}
        for name, p in model.named_parameters():
            if name.endswith("query_key_value.weight"):
                out_features, in_features = p.shape
                shapes[name.replace(".weight", ".lora_A.weight")] = (lora_r, in_features)
                shapes[name.replace(".weight", ".lora_B.weight")] = (out_features, lora_r)
    else:
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) * 1e-3 for name, shape in shapes.items()}


def measure(update: dict[str, torch.Tensor], clients: int) -> list[dict[str, Any]]:
    """Each codec's blob as a client sends it (the round loop's own encoder) and per round for ``clients``."""
    global_bytes = len(encode_tensors(update))  # the global weights travel dense, one copy per client
    rows = []
    for name in available():
        codec = None if name == "none" else codec_for(name)
        encoding = UpdateEncoding(codec)
        started = time.perf_counter()
        blob, _residual = encoding.encode(update, {} if encoding.keeps_residual else None)
        encode_s = time.perf_counter() - started
        started = time.perf_counter()
        decode_update(encoding.name, blob, update, codec)
        decode_s = time.perf_counter() - started
        rows.append(
            {
                "codec": name,
                "blob_codec": encoding.name,
                "bytes": len(blob),
                "round_upload_bytes": len(blob) * clients,
                "round_download_bytes": global_bytes * clients,
                "encode_s": round(encode_s, 3),
                "decode_s": round(decode_s, 3),
            }
        )
    reference = next(r["bytes"] for r in rows if r["codec"] == "none")
    for row in rows:
        row["fewer_bytes_than_none"] = round(reference / row["bytes"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", type=Path, default=DEFAULT_MODEL_CONFIG)
    parser.add_argument("--lora-r", type=int, default=None, help="measure LoRA adapters of this rank instead")
    parser.add_argument("--clients", type=int, default=8, help="clients per round (the Dolly bench's 8)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.model_config.is_file():
        raise SystemExit(f"{args.model_config}: not found (the shared Pythia configs are needed)")
    torch.set_num_threads(1)
    update = update_shapes(args.model_config, args.lora_r)
    rows = measure(update, args.clients)
    result = {
        "bench": "communication",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "model": str(args.model_config.parent.name),
        "trained": f"lora r={args.lora_r}" if args.lora_r else "full model",
        "parameters": sum(t.numel() for t in update.values()),
        "clients_per_round": args.clients,
        "rows": rows,
    }
    for row in rows:
        print(
            f"{row['codec']:>5}  {row['bytes'] / 2**20:9.2f} MiB  {row['fewer_bytes_than_none']:6.2f}x fewer"
            f"  encode {row['encode_s']:.3f} s  decode {row['decode_s']:.3f} s",
            file=sys.stderr,
        )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
